"""The emulator's entry point: moto_server with sightline's patches installed.

* ``dynamodb_serial``: DynamoDB requests one at a time, so transactions and conditional
  writes are atomic as on AWS;
* ``s3vectors_query``: S3 Vectors QueryVectors and the checks AWS makes.

Takes moto_server's arguments (``-H HOST -p PORT``).
"""

import sys

import dynamodb_serial
import s3vectors_query


def main() -> None:
    dynamodb_serial.install()
    s3vectors_query.install()
    from moto.server import main as moto_server_main

    moto_server_main(sys.argv[1:])


if __name__ == "__main__":
    main()
