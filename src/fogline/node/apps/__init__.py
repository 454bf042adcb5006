"""Edge apps on a node: loading an app directory (manifest + code); the supervised
workers, HTTP front and MQTT ingest that run apps build on this package."""
