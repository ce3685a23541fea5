"""Label Studio's ML backend protocol, served by loopserve (an HTTP adapter beside the gRPC services).

`labeling_config`: which labeling configs map to an annotation task; `protocol`: Label Studio JSON to
loopserve requests and back (plain functions); `backend`: the adapter's logic over loopserve's gRPC
client; `refresh`: fresh predictions after a swap; `http_app`: the FastAPI routes (auth first, then
the body); `project`: set up a Label Studio project with loopserve behind it (the CLI's `connect`).
"""
