"""Prefect flows that orchestrate the engine, the store and Label Studio, plus the CLI.

Importing this package imports nothing heavy; flows live in their own modules.
"""
