"""moto_server that handles one request at a time.

DynamoDB applies a conditional write atomically; moto's threaded server does
not: two concurrent UpdateItem calls with `attribute_not_exists(lock_until)`
can both succeed when their threads interleave. The contact lock and the token
lease rely on that atomicity, so the tests serialise requests here (connections
stay concurrent and keep-alive, as with the stock `moto_server`).

Usage: python moto_server.py HOST PORT
"""

import os
import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


def serialised(app):
    lock = threading.Lock()

    def handle(environ, start_response):
        with lock:
            result = app(environ, start_response)
            try:
                # Drain inside the lock: a lazy body still runs backend code.
                return [b"".join(result)]
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()

    return handle


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, serialised(app), threaded=True)


if __name__ == "__main__":
    main()
