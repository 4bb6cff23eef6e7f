"""Checks of the DynamoDB serialization patch (dynamodb_serial.py) through boto3 against an
in-process moto server. Run by the image build (Dockerfile).
"""

import threading
import unittest

import boto3
from botocore.exceptions import ClientError
from moto.dynamodb.models import DynamoDBBackend
from moto.server import ThreadedMotoServer

import dynamodb_serial

dynamodb_serial.install()


class SerializedDynamoDbTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        cls.server.start()
        host, port = cls.server.get_host_and_port()
        cls.endpoint = f"http://{host}:{port}"
        cls.client().create_table(
            TableName="t",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    @classmethod
    def client(cls):
        # One client per thread: each request of a race is its own connection.
        return boto3.client(
            "dynamodb",
            endpoint_url=cls.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def test_a_cancelled_transaction_does_not_undo_a_write_made_while_it_ran(self):
        # Transaction A updates `gate` and then fails its check on `missing`, so moto rolls
        # the table back to its copy from before A. It is held inside its first item while B
        # writes `other`; B's write must survive A's rollback.
        inside, go_on = threading.Event(), threading.Event()
        original_get_item = DynamoDBBackend.get_item

        def held_get_item(backend, table_name, keys, *args, **kwargs):
            if keys.get("pk", {}).get("S") == "gate" and not inside.is_set():
                inside.set()
                go_on.wait(10)
            return original_get_item(backend, table_name, keys, *args, **kwargs)

        DynamoDBBackend.get_item = held_get_item
        outcome = {}
        try:

            def transaction():
                try:
                    self.client().transact_write_items(
                        TransactItems=[
                            {
                                "Update": {
                                    "TableName": "t",
                                    "Key": {"pk": {"S": "gate"}},
                                    "UpdateExpression": "SET v = :one",
                                    "ExpressionAttributeValues": {":one": {"N": "1"}},
                                }
                            },
                            {
                                "ConditionCheck": {
                                    "TableName": "t",
                                    "Key": {"pk": {"S": "missing"}},
                                    "ConditionExpression": "attribute_exists(pk)",
                                }
                            },
                        ]
                    )
                    outcome["a"] = "committed"
                except ClientError as e:
                    outcome["a"] = e.response["Error"]["Code"]

            def write_other():
                self.client().put_item(TableName="t", Item={"pk": {"S": "other"}})

            a = threading.Thread(target=transaction)
            a.start()
            self.assertTrue(inside.wait(10), "the transaction never reached its first item")
            b = threading.Thread(target=write_other)
            b.start()
            b.join(0.5)
            b_finished_while_a_held = not b.is_alive()
            go_on.set()
            a.join(10)
            b.join(10)
        finally:
            DynamoDBBackend.get_item = original_get_item
            go_on.set()

        self.assertEqual(outcome.get("a"), "TransactionCanceledException")
        self.assertFalse(b_finished_while_a_held, "a write ran inside another request")
        got = self.client().get_item(TableName="t", Key={"pk": {"S": "other"}})
        self.assertIn("Item", got, "the write made beside the cancelled transaction was lost")
        gate = self.client().get_item(TableName="t", Key={"pk": {"S": "gate"}})
        self.assertNotIn("Item", gate, "the cancelled transaction's own write was kept")

    def test_racing_conditional_puts_admit_exactly_one(self):
        wins, losses = [], []

        def put(i):
            try:
                self.client().put_item(
                    TableName="t",
                    Item={"pk": {"S": "claim"}, "owner": {"N": str(i)}},
                    ConditionExpression="attribute_not_exists(pk)",
                )
                wins.append(i)
            except ClientError as e:
                losses.append(e.response["Error"]["Code"])

        threads = [threading.Thread(target=put, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(len(wins), 1, f"winners: {wins}")
        self.assertEqual(losses, ["ConditionalCheckFailedException"] * 15)

    def test_installing_twice_wraps_once(self):
        before = dynamodb_serial.DynamoHandler.call_action
        dynamodb_serial.install()
        self.assertIs(dynamodb_serial.DynamoHandler.call_action, before)


if __name__ == "__main__":
    unittest.main()
