"""Evaluation: run decode modes over prompt sets, score the answers, report tables."""
