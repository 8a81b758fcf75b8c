"""Tests of the store service (repository, servicer, process) and gRPC plumbing."""
