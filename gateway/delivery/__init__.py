"""Delivery beyond the socket: signed webhooks, uploads to presigned URLs, the egress guard."""
