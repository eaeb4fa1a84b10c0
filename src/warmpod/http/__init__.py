"""The HTTP face: the Litestar app, its routes, authentication, throttling and problem details."""
