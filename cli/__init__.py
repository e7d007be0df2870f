"""The ``cabs-stream`` command line (installed as the package ``cabs_stream_cli``)."""
