"""Checks of the QueryVectors patch (s3vectors_query.py) through boto3 against an in-process
moto server. Run by the image build (Dockerfile), so an image whose emulation drifted from
the documented semantics is never tagged.
"""

import unittest

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

import s3vectors_query

s3vectors_query.install()


class QueryVectorsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        cls.server.start()
        host, port = cls.server.get_host_and_port()
        cls.client = boto3.client(
            "s3vectors",
            endpoint_url=f"http://{host}:{port}",
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
            # Let out-of-range values reach the server, whose answer is what is tested.
            config=Config(parameter_validation=False),
        )
        c = cls.client
        c.create_vector_bucket(vectorBucketName="bucket")
        c.create_index(
            vectorBucketName="bucket",
            indexName="cos",
            dataType="float32",
            dimension=3,
            distanceMetric="cosine",
            metadataConfiguration={"nonFilterableMetadataKeys": ["note"]},
        )
        c.put_vectors(
            vectorBucketName="bucket",
            indexName="cos",
            vectors=[
                {
                    "key": "a",
                    "data": {"float32": [1, 0, 0]},
                    "metadata": {"tenant": "t1", "tags": ["x", "y"], "year": 2020, "note": "n"},
                },
                {
                    "key": "b",
                    "data": {"float32": [1, 1, 0]},
                    "metadata": {"tenant": "t1", "tags": ["y"], "year": 2021},
                },
                {
                    "key": "c",
                    "data": {"float32": [0, 1, 0]},
                    "metadata": {"tenant": "t2", "tags": "x", "flag": True},
                },
                {"key": "d", "data": {"float32": [-1, 0, 0]}},
            ],
        )
        c.create_index(
            vectorBucketName="bucket",
            indexName="l2-index",
            dataType="float32",
            dimension=2,
            distanceMetric="euclidean",
        )
        c.put_vectors(
            vectorBucketName="bucket",
            indexName="l2-index",
            vectors=[
                {"key": "o", "data": {"float32": [0, 0]}},
                {"key": "p", "data": {"float32": [3, 4]}},
            ],
        )

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def query(self, index="cos", vector=(1, 0, 0), **kwargs):
        kwargs.setdefault("topK", 10)
        return self.client.query_vectors(
            vectorBucketName="bucket",
            indexName=index,
            queryVector={"float32": list(vector)},
            **kwargs,
        )

    def keys(self, **kwargs):
        return [v["key"] for v in self.query(**kwargs)["vectors"]]

    def error(self, call, **kwargs):
        with self.assertRaises(ClientError) as caught:
            call(**kwargs)
        return caught.exception.response["Error"]["Code"]

    def test_cosine_ranking_and_distances(self):
        out = self.query(returnDistance=True)
        self.assertEqual(out["distanceMetric"], "cosine")
        got = [(v["key"], round(v["distance"], 4)) for v in out["vectors"]]
        self.assertEqual(got, [("a", 0.0), ("b", 0.2929), ("c", 1.0), ("d", 2.0)])
        self.assertNotIn("metadata", out["vectors"][0])

    def test_flags_and_top_k(self):
        out = self.query(topK=2)
        self.assertEqual(out["vectors"], [{"key": "a"}, {"key": "b"}])
        out = self.query(topK=1, returnMetadata=True)
        self.assertEqual(out["vectors"][0]["metadata"]["tags"], ["x", "y"])

    def test_euclidean(self):
        out = self.query(index="l2-index", vector=(0, 0), returnDistance=True)
        self.assertEqual(out["distanceMetric"], "euclidean")
        self.assertEqual([(v["key"], v["distance"]) for v in out["vectors"]], [("o", 0.0), ("p", 5.0)])

    def test_filters(self):
        cases = [
            ({"tenant": "t1"}, ["a", "b"]),
            ({"tags": "x"}, ["a", "c"]),  # any element of a list matches
            ({"tags": {"$eq": "y"}}, ["a", "b"]),
            ({"tenant": {"$ne": "t1"}}, ["c", "d"]),  # a missing key is "not equal"
            ({"tags": {"$in": ["x", "q"]}}, ["a", "c"]),
            ({"tags": {"$nin": ["x"]}}, ["b", "d"]),
            ({"year": {"$exists": True}}, ["a", "b"]),
            ({"year": {"$exists": False}}, ["c", "d"]),
            ({"year": {"$gt": 2019, "$lt": 2021}}, ["a"]),
            ({"year": {"$gte": 2021}}, ["b"]),
            ({"year": {"$lte": 2020}}, ["a"]),
            ({"flag": True}, ["c"]),
            ({"flag": 1}, []),  # booleans are not numbers
            ({"tenant": "t1", "tags": "x"}, ["a"]),  # several keys: AND
            ({"$and": [{"tenant": "t1"}, {"tags": "y"}]}, ["a", "b"]),
            ({"$or": [{"tenant": "t2"}, {"year": {"$gte": 2021}}]}, ["b", "c"]),
        ]
        for flt, expected in cases:
            with self.subTest(filter=flt):
                self.assertEqual(self.keys(filter=flt), expected)

    def test_refusals(self):
        bad_filters = [
            {"note": "n"},  # non-filterable key
            {"tags": {"$regex": "x"}},
            {"tags": {"$in": []}},
            {"tags": ["x"]},
            {"year": {"$gt": "2020"}},
            {"$and": []},
            {"$not": {"tags": "x"}},
        ]
        for flt in bad_filters:
            with self.subTest(filter=flt):
                self.assertEqual(self.error(self.query, filter=flt), "ValidationException")
        self.assertEqual(self.error(self.query, vector=(1, 0)), "ValidationException")
        self.assertEqual(self.error(self.query, vector=(0, 0, 0)), "ValidationException")
        self.assertEqual(self.error(self.query, topK=0), "ValidationException")
        self.assertEqual(self.error(self.query, topK=101), "ValidationException")
        self.assertEqual(self.error(self.query, index="missing"), "NotFoundException")

    def test_stricter_writes(self):
        c = self.client
        self.assertEqual(
            self.error(
                c.create_index,
                vectorBucketName="bucket",
                indexName="cos",
                dataType="float32",
                dimension=3,
                distanceMetric="cosine",
            ),
            "ConflictException",
        )
        self.assertEqual(len(self.keys()), 4)  # the conflict left the index alone
        self.assertEqual(
            self.error(
                c.create_index,
                vectorBucketName="bucket",
                indexName="Bad_Name",
                dataType="float32",
                dimension=3,
                distanceMetric="cosine",
            ),
            "ValidationException",
        )

        def put(vectors):
            return c.put_vectors(vectorBucketName="bucket", indexName="cos", vectors=vectors)

        too_many = [{"key": f"k{i}", "data": {"float32": [1, 0, 0]}} for i in range(501)]
        big = {"tags": [f"tag-{i:04d}" for i in range(300)]}
        for vectors in (
            too_many,
            [{"key": "z", "data": {"float32": [0, 0, 0]}}],
            [{"key": "z", "data": {"float32": [1, 0]}}],
            [{"key": "z", "data": {"float32": [1, 0, 0]}, "metadata": big}],
            [{"key": "z", "data": {"float32": [1, 0, 0]}, "metadata": {"m": {"nested": 1}}}],
        ):
            with self.subTest(vectors=str(vectors)[:60]):
                self.assertEqual(self.error(put, vectors=vectors), "ValidationException")
        self.assertEqual(len(self.keys()), 4)  # nothing of a refused call was written


if __name__ == "__main__":
    unittest.main()
