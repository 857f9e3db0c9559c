"""tenebra's I/O: the aiohttp application, the provider link, the local provider."""
