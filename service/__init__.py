"""The tokenwire server: gRPC service, engine, scheduler, model runner."""
