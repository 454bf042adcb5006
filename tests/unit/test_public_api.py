import fogline


def test_public_surface_is_deliberate() -> None:
    assert fogline.__all__ == ["App", "Context", "Message", "NodeInfo", "Request",
                               "Response", "__version__"]
    assert all(hasattr(fogline, name) for name in fogline.__all__)
