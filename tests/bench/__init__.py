"""Tests of the benchmark suite (``bench/``): its pure parts and a smoke run."""
