"""tenebra's sans-I/O core: the Runware wire format and its rules.

No asyncio, no sockets, no clocks, nothing from ``gateway``: bytes and values in, values and
bytes out, so every rule is tested without a network.
"""
