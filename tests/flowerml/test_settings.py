"""flowerml.settings: FLOWERML_* from the environment and .env, the errors, the S3 overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerml.core.errors import SettingsError, UserError
from flowerml.io.storage import S3Options
from flowerml.io.storage_local import LocalStore
from flowerml.io.storage_s3 import S3Store
from flowerml.settings import Settings, build_store, load_settings
from tests.helpers.cli import assert_refused, invoke


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
    ("FLOWERML_DOWNLOAD_RETRIES", "-1", "must be at least 0"),
    ("FLOWERML_DOWNLOAD_RETRIES", "51", "must be at most 50"),
    ("FLOWERML_DOWNLOAD_RETRIES", "many", "must be a whole number"),
    ("FLOWERML_DOWNLOAD_TIMEOUT", "0", "must be more than 0"),
    ("FLOWERML_DOWNLOAD_TIMEOUT", "soon", "not a number"),
    ("FLOWERML_DOWNLOAD_TIMEOUT", "nan", "not a number (NaN)"),
    ("FLOWERML_DOWNLOAD_TIMEOUT", "inf", "must be a finite number"),
    ("FLOWERML_TRANSFER_CONCURRENCY", "0", "must be at least 1"),
    ("FLOWERML_DATASET", "Flowers 102", "must be 1-63 characters of a-z, 0-9, '.', '_' and '-'"),
    ("FLOWERML_STORE", "   ", "must not be empty"),
    ("FLOWERML_STORE", "https://example.org/x", "uses an unsupported scheme (https://); "
                                                "a store is a folder path, file://PATH or "
                                                "s3://bucket[/prefix]"),
    ("FLOWERML_STORE", "ftp://example.org/x", "uses an unsupported scheme (ftp://)"),
    ("FLOWERML_STORE", "s3://", "'s3://' has no bucket name"),
    ("FLOWERML_STORE", "s3://Bad_Bucket!/x", "'s3://Bad_Bucket!/x' has an invalid bucket name: "
                                             "S3 bucket names are 3-63 characters"),
    ("FLOWERML_CACHE_DIR", "", "must not be empty"),
    ("FLOWERML_S3_ENDPOINT_URL", "minio:9000", "must start with http:// or https://"),
    ("FLOWERML_S3_ENDPOINT_URL", "http://minio:99999", "the URL has an invalid port"),
    ("FLOWERML_S3_ADDRESSING_STYLE", "sideways", "must be 'auto', 'virtual' or 'path'"),
    ("FLOWERML_S3_REQUEST_CHECKSUM_CALCULATION", "always", "must be 'when_supported' or"),
])
def test_a_bad_value_fails_naming_the_variable(variable: str, value: str, reason: str):
    message = _error(**{variable: value})
    assert message.startswith(f"invalid setting {variable}: ")
    assert reason in message
    # In words: none of pydantic's own phrasing, and NaN is not reported as a bound.
    assert "Value error" not in message and "Input should" not in message
    assert "3600" not in message


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


# --- where a bad value came from (issue 9) -------------------------------------------------


def _refusal(**overrides: object) -> str:
    with pytest.raises(SettingsError) as err:
        load_settings(**overrides)
    message = str(err.value)
    assert "\n" not in message and "Value error" not in message
    return message


def test_a_bad_option_is_named_as_the_option_not_the_variable():
    message = _refusal(store="s3://Bad_Bucket!/x")
    assert message.startswith("invalid --store: 's3://Bad_Bucket!/x' has an invalid bucket name")
    assert "FLOWERML_STORE" not in message

    message = _refusal(dataset="Not A Name")
    assert message.startswith("invalid --dataset: must be 1-63 characters")
    assert "FLOWERML_DATASET" not in message


def test_an_option_and_a_variable_are_each_named_their_way(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLOWERML_DATASET", "UPPER")
    message = _refusal(store="ftp://example.org/x")
    assert "invalid --store: 'ftp://example.org/x' uses an unsupported scheme" in message
    assert "invalid setting FLOWERML_DATASET: must be 1-63 characters" in message


def test_a_bad_value_from_the_dotenv_file_names_the_file(clean_env: Path):
    (clean_env / ".env").write_text("FLOWERML_DOWNLOAD_TIMEOUT=nan\nflowerml_dataset=Bad Name\n")
    message = _refusal()
    dotenv = clean_env / ".env"
    assert f"invalid setting FLOWERML_DOWNLOAD_TIMEOUT in {dotenv}: not a number (NaN)" in message
    assert f"invalid setting FLOWERML_DATASET in {dotenv}: must be 1-63 characters" in message


def test_the_environment_beats_the_dotenv_file_in_the_message_too(
        monkeypatch: pytest.MonkeyPatch, clean_env: Path):
    (clean_env / ".env").write_text("FLOWERML_DOWNLOAD_RETRIES=7\n")
    monkeypatch.setenv("FLOWERML_DOWNLOAD_RETRIES", "-3")
    assert _refusal() == "invalid setting FLOWERML_DOWNLOAD_RETRIES: must be at least 0"


def test_a_dotenv_file_that_is_not_utf8_is_named(clean_env: Path):
    (clean_env / ".env").write_bytes(b"FLOWERML_DATASET=flowers\nFLOWERML_STORE=caf\xe9-secret\n")
    message = _refusal()
    assert message == (f"cannot read {clean_env / '.env'}: not UTF-8 text (line 2); flowerml "
                       "reads .env files as UTF-8, save it in that encoding")
    assert "secret" not in message


# --- the cache directory is usable, or refused naming FLOWERML_CACHE_DIR -------------------


def test_a_cache_dir_that_is_a_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "cache"))
    assert _refusal() == (f"invalid setting FLOWERML_CACHE_DIR: {tmp_path / 'cache'} is a file, "
                          "not a folder")


def test_a_cache_dir_inside_a_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "file" / "cache"))
    assert _refusal() == (f"invalid setting FLOWERML_CACHE_DIR: {tmp_path / 'file' / 'cache'} "
                          f"cannot be a folder: {tmp_path / 'file'} is a file")


def test_an_unwritable_cache_dir_is_refused(monkeypatch: pytest.MonkeyPatch):
    # procfs refuses new files to everyone, root included (a chmod would not stop root).
    monkeypatch.setenv("FLOWERML_CACHE_DIR", "/proc/flowerml-cache")
    assert _refusal() == ("invalid setting FLOWERML_CACHE_DIR: /proc/flowerml-cache cannot be "
                          "created: /proc is not writable")


def test_the_default_cache_dir_is_checked_too_and_said_to_be_the_default(
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir("/proc")
    assert _refusal() == ("invalid setting FLOWERML_CACHE_DIR (not set: its default): "
                          "/proc/flowerml-cache cannot be created: /proc is not writable")


def test_checking_the_cache_dir_creates_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("FLOWERML_CACHE_DIR", str(tmp_path / "a" / "cache"))
    assert load_settings().cache_dir == tmp_path / "a" / "cache"
    assert list(tmp_path.iterdir()) == []


def test_a_local_store_that_is_a_file_is_refused(tmp_path: Path):
    (tmp_path / "store").write_text("")
    assert _refusal(store=str(tmp_path / "store")) == (
        f"invalid --store: {tmp_path / 'store'} is a file, not a folder")


def test_file_uri_stores_work(tmp_path: Path):
    store = build_store(load_settings(store=f"file://{tmp_path}/store"))
    assert isinstance(store, LocalStore) and store.root == tmp_path / "store"


# --- as the CLI shows it: one line, exit 2, nothing written --------------------------------


def test_cli_refuses_a_bad_bucket_in_one_line(clean_env: Path):
    result = invoke("ingest", "--source", str(clean_env), "--store", "s3://Bad_Bucket!/x")
    assert_refused(result, "invalid --store: 's3://Bad_Bucket!/x' has an invalid bucket name")
    assert "FLOWERML_STORE" not in result.stderr
    assert list(clean_env.iterdir()) == []


def test_cli_names_the_variable_when_the_store_came_from_the_environment(clean_env: Path):
    result = invoke("registry", "list", env={"FLOWERML_STORE": "ftp://example.org/store"})
    assert_refused(result, "invalid setting FLOWERML_STORE: 'ftp://example.org/store' uses an "
                           "unsupported scheme (ftp://); a store is a folder path, file://PATH "
                           "or s3://bucket[/prefix]")
    assert list(clean_env.iterdir()) == []


def test_cli_refuses_a_cache_dir_that_is_a_file(clean_env: Path):
    (clean_env / "cache").write_text("")
    result = invoke("ingest", "--source", str(clean_env), "--store", str(clean_env / "store"),
                    cache=clean_env / "cache")
    assert_refused(result, f"invalid setting FLOWERML_CACHE_DIR: {clean_env / 'cache'} is a "
                           "file, not a folder")
    assert sorted(p.name for p in clean_env.iterdir()) == ["cache"]


def test_cli_refuses_an_undecodable_dotenv(clean_env: Path):
    (clean_env / ".env").write_bytes(b"FLOWERML_DATASET=\xff\n")
    result = invoke("registry", "list", "--store", str(clean_env / "store"))
    assert_refused(result, f"cannot read {clean_env / '.env'}: not UTF-8 text (line 1)")
    assert sorted(p.name for p in clean_env.iterdir()) == [".env"]


def test_cli_reports_nan_as_not_a_number(clean_env: Path):
    (clean_env / ".env").write_text("FLOWERML_DOWNLOAD_TIMEOUT=NaN\n")
    result = invoke("ingest", "--source", str(clean_env), "--store", str(clean_env / "store"))
    assert_refused(result, f"invalid setting FLOWERML_DOWNLOAD_TIMEOUT in {clean_env / '.env'}: "
                           "not a number (NaN)")
    assert "3600" not in result.stderr
    assert sorted(p.name for p in clean_env.iterdir()) == [".env"]


@pytest.mark.parametrize(("env", "line"), [
    ({"AWS_ENDPOINT_URL_S3": "notaurl"},
     "invalid S3 endpoint (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or endpoint_url in the AWS "
     "config): 'notaurl' is not an http:// or https:// URL"),
    ({"AWS_ENDPOINT_URL": "ftp://user:SECRET@host/"},
     "invalid S3 endpoint ftp://host/ (from AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or "
     "endpoint_url in the AWS config): not a URL S3 can be reached at"),
    ({"FLOWERML_S3_REGION": "bad region!"},
     "invalid setting FLOWERML_S3_REGION: must be a region name: letters, digits and '-' "
     "(like eu-west-1)"),
    ({"AWS_PROFILE": "nosuchprofile"},
     "invalid setting AWS_PROFILE: no profile 'nosuchprofile' in the AWS config or credentials "
     "file (~/.aws/config, ~/.aws/credentials)"),
])
def test_cli_refuses_a_bad_aws_setting_in_one_line_naming_it(clean_env: Path, env: dict,
                                                             line: str):
    result = invoke("registry", "list", "--store", "s3://flowerml-nowhere",
                    env={**env, "AWS_CONFIG_FILE": str(clean_env / "none"),
                         "AWS_SHARED_CREDENTIALS_FILE": str(clean_env / "none")})
    assert_refused(result, line)
    assert result.stderr == f"flowerml: error: {line}\n" and result.stdout == ""
    assert "SECRET" not in result.output


def test_cli_refuses_a_store_path_in_a_symbolic_link_loop(clean_env: Path):
    (clean_env / "loop").symlink_to("loop")
    for name, value in (("FLOWERML_STORE", "loop/store"), ("FLOWERML_CACHE_DIR", "loop")):
        result = invoke("registry", "list", env={name: str(clean_env / value)})
        assert_refused(result, f"invalid setting {name}: {clean_env / value} cannot be used: a "
                               "symbolic link loop on its path")
    output = invoke("score", str(clean_env), "--output", str(clean_env / "loop" / "x"),
                    "--store", str(clean_env / "store"))
    assert_refused(output, f"--output {clean_env}/loop/x cannot be used: a symbolic link loop")
    assert sorted(p.name for p in clean_env.iterdir()) == ["loop"]


def test_cli_never_echoes_credentials_in_an_endpoint_url(clean_env: Path, moto_endpoint: str):
    """A user:password@ in an endpoint URL is left out of every message that shows it."""
    unreachable = invoke("registry", "list", "--store", "s3://flowerml-nowhere",
                         env={"FLOWERML_S3_ENDPOINT_URL": "http://user:PASS@127.0.0.1:1"})
    assert_refused(unreachable, "cannot reach S3 endpoint http://127.0.0.1:1 (bucket "
                                "'flowerml-nowhere'): connection refused")
    missing = invoke("registry", "list", "--store", "s3://flowerml-nowhere", env={
        "FLOWERML_S3_ENDPOINT_URL": moto_endpoint.replace("://", "://user:PASS@")})
    assert_refused(missing, f"bucket 'flowerml-nowhere' at {moto_endpoint} does not exist")
    for result in (unreachable, missing):
        assert "PASS" not in result.output and "user" not in result.output
