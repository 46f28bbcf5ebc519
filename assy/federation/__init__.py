"""Federated rounds on Flower (DESIGN.md "Federation")."""
