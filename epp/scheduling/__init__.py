"""Filters, scorers and pickers that choose an endpoint for each request."""
