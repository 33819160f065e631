"""flowerml.settings: FLOWERML_* from the environment and .env, the errors, the S3 overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerml.errors import SettingsError, UserError
from flowerml.settings import Settings, build_store, load_settings
from flowerml.storage import LocalStore, S3Options, S3Store


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No FLOWERML_* variable set, and a working directory without a .env file."""
    import os

    for name in [n for n in os.environ if n.startswith("FLOWERML_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _error(**env: str) -> str:
    mp = pytest.MonkeyPatch()
    try:
        for name, value in env.items():
            mp.setenv(name, value)
        with pytest.raises(SettingsError) as err:
            load_settings()
    finally:
        mp.undo()
    message = str(err.value)
    assert message.startswith("invalid setting ") and "\n" not in message
    return message


# --- defaults ------------------------------------------------------------------------------


def test_defaults():
    settings = load_settings()
    assert settings.store == "./flowerml-store"
    assert settings.dataset == "flowers102"
    assert settings.cache_dir == Path("./flowerml-cache")
    assert (settings.s3_endpoint_url, settings.s3_region, settings.s3_addressing_style) == (
        None, None, None)
    assert settings.s3_request_checksum_calculation is None
    assert settings.s3_response_checksum_validation is None
    assert settings.transfer_concurrency == 16
    assert (settings.download_retries, settings.download_timeout) == (5, 60.0)


def test_every_setting_is_documented():
    for name, info in Settings.model_fields.items():
        assert info.description, name


# --- where values come from ----------------------------------------------------------------


def test_environment_values_are_read_and_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("FLOWERML_STORE", "s3://bucket/prefix")
    monkeypatch.setenv("FLOWERML_DATASET", "flowers-small")
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FLOWERML_DOWNLOAD_RETRIES", "0")
    monkeypatch.setenv("FLOWERML_DOWNLOAD_TIMEOUT", "2.5")
    monkeypatch.setenv("FLOWERML_TRANSFER_CONCURRENCY", "3")

    settings = load_settings()

    assert (settings.store, settings.dataset) == ("s3://bucket/prefix", "flowers-small")
    assert settings.cache_dir == tmp_path / "cache"
    assert (settings.download_retries, settings.download_timeout) == (0, 2.5)
    assert settings.transfer_concurrency == 3


def test_explicit_overrides_win_and_none_is_unset(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLOWERML_STORE", "/from/env")
    monkeypatch.setenv("FLOWERML_DATASET", "from-env")

    settings = load_settings(store="/from/cli", dataset=None)

    assert settings.store == "/from/cli"
    assert settings.dataset == "from-env"


def test_dotenv_file_is_read_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch,
                                                      clean_env: Path):
    (clean_env / ".env").write_text("FLOWERML_DATASET=from-dotenv\n"
                                    "FLOWERML_DOWNLOAD_RETRIES=7\n")
    assert load_settings().dataset == "from-dotenv"
    assert load_settings().download_retries == 7

    monkeypatch.setenv("FLOWERML_DATASET", "from-env")
    assert load_settings().dataset == "from-env"


def test_unknown_flowerml_variables_are_ignored(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLOWERML_NOT_A_SETTING", "whatever")
    assert load_settings().dataset == "flowers102"


# --- bad values name the variable ----------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "reason"), [
    ("FLOWERML_DOWNLOAD_RETRIES", "-1", "greater than or equal to 0"),
    ("FLOWERML_DOWNLOAD_RETRIES", "51", "less than or equal to 50"),
    ("FLOWERML_DOWNLOAD_RETRIES", "many", "valid integer"),
    ("FLOWERML_DOWNLOAD_TIMEOUT", "0", "greater than 0"),
    ("FLOWERML_TRANSFER_CONCURRENCY", "0", "greater than or equal to 1"),
    ("FLOWERML_DATASET", "Flowers 102", "should match pattern"),
    ("FLOWERML_STORE", "   ", "must not be empty"),
    ("FLOWERML_STORE", "https://example.org/x", "s3://bucket[/prefix]"),
    ("FLOWERML_STORE", "s3://", "needs a bucket name"),
    ("FLOWERML_S3_ENDPOINT_URL", "minio:9000", "must start with http:// or https://"),
    ("FLOWERML_S3_ADDRESSING_STYLE", "sideways", "'auto', 'virtual' or 'path'"),
    ("FLOWERML_S3_REQUEST_CHECKSUM_CALCULATION", "always", "'when_supported' or"),
])
def test_a_bad_value_fails_naming_the_variable(variable: str, value: str, reason: str):
    message = _error(**{variable: value})
    assert message.startswith(f"invalid setting {variable}: ")
    assert reason in message


def test_the_error_is_a_user_error_and_names_every_bad_variable():
    message = _error(FLOWERML_DOWNLOAD_RETRIES="-1", FLOWERML_DATASET="UPPER")
    assert "FLOWERML_DATASET: " in message and "FLOWERML_DOWNLOAD_RETRIES: " in message
    assert "; " in message
    assert issubclass(SettingsError, UserError)


def test_the_error_does_not_echo_the_value():
    message = _error(FLOWERML_S3_ENDPOINT_URL="ftp://alice:s3cr3t@minio.internal:9000")
    assert "FLOWERML_S3_ENDPOINT_URL" in message
    assert "s3cr3t" not in message and "alice" not in message


def test_store_value_is_stripped_and_endpoint_blank_is_unset(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLOWERML_STORE", "  s3://bucket  ")
    monkeypatch.setenv("FLOWERML_S3_ENDPOINT_URL", "")
    settings = load_settings()
    assert settings.store == "s3://bucket"
    assert settings.s3_endpoint_url is None


# --- S3 options and the store --------------------------------------------------------------


def test_s3_options_map_every_s3_setting(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLOWERML_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("FLOWERML_S3_REGION", "eu-west-3")
    monkeypatch.setenv("FLOWERML_S3_ADDRESSING_STYLE", "path")
    monkeypatch.setenv("FLOWERML_S3_REQUEST_CHECKSUM_CALCULATION", "when_required")
    monkeypatch.setenv("FLOWERML_S3_RESPONSE_CHECKSUM_VALIDATION", "when_supported")

    assert load_settings().s3_options() == S3Options(
        endpoint_url="http://127.0.0.1:9000", region="eu-west-3", addressing_style="path",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_supported")


def test_unset_s3_settings_leave_boto3_its_own_chain():
    assert load_settings().s3_options() == S3Options()


def test_build_store_local(tmp_path: Path):
    store = build_store(load_settings(store=str(tmp_path / "store"), transfer_concurrency=5))
    assert isinstance(store, LocalStore)
    assert store.concurrency == 5
    store.put_bytes("a/b.txt", b"hello")
    assert (tmp_path / "store" / "a" / "b.txt").read_bytes() == b"hello"


def test_build_store_s3_uses_the_overrides(moto_endpoint: str, s3_bucket: str):
    settings = load_settings(store=f"s3://{s3_bucket}/ml", s3_endpoint_url=moto_endpoint,
                             s3_addressing_style="path", transfer_concurrency=4)
    store = build_store(settings)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.concurrency) == (s3_bucket, "ml", 4)
    assert store.uri == f"s3://{s3_bucket}/ml"
    assert store.endpoint == moto_endpoint
    store.put_bytes("k.txt", b"on moto")
    assert store.get_bytes("k.txt") == b"on moto"
