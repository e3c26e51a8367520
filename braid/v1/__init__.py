"""Generated gRPC/protobuf code of the braid.v1 API (do not edit; make proto)."""
