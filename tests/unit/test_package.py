from embervm import __version__, errors


def test_every_api_error_maps_to_a_model_error_code() -> None:
    codes = {cls.code for cls in errors.ApiError.__subclasses__()}
    assert "ValidationException" in codes
    assert len(codes) == len(errors.ApiError.__subclasses__())
    assert __version__
