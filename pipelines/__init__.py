"""Apache Beam jobs and the ``tempo`` command line."""
