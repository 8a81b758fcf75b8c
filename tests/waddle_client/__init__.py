"""Tests of the Python client, ``waddle_client``: unit, against a test peer, and end to end."""
