"""The ``braid`` command-line client."""
