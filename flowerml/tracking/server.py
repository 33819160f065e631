"""The MLflow tracking server flowerml mirrors to: its client, whether it answers, and what of
ours may be shown to it.

MLflow is imported here, lazily, and only when a tracking URI is given: the base install runs
without it (`MissingExtra` names `pip install 'flowerml[mlflow]'` when a URI is set and the extra
is missing). MLflow's own "View run at URL" line on stdout is turned off (stdout carries --json).
Its HTTP client retries a refused connection for minutes by default; a mirror must
cost a training run seconds, so unless the user set MLflow's own variables we make one attempt
with a short timeout, and the mirror catches up later instead.

Nothing secret reaches the server or a message: the tracking URI is shown without user:pass@ or
query (`flowerml.io.urls.redact_url`), and `public_params` drops values named like credentials
and redacts URLs among the params.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from flowerml.core.errors import UserError
from flowerml.core.extras import MissingExtra
from flowerml.io.urls import redact_url

if TYPE_CHECKING:
    from mlflow import MlflowClient

REQUEST_TIMEOUT_SECONDS = 10
"""How long one request to the tracking server may take before the mirror gives up on it."""

SECRET_NAME = re.compile(r"(secret|token|password|passwd|credential|api_?key|access_?key|auth)",
                         re.IGNORECASE)
URL_WITH_SECRETS = re.compile(r"^[a-z][a-z0-9+.-]*://([^/@\s]*@|[^?\s]*\?)", re.IGNORECASE)


class TrackingUnavailable(UserError):
    """The tracking server named by --mlflow / FLOWERML_MLFLOW_URI does not answer at start."""


def import_mlflow() -> Any:
    """The mlflow module, configured for short requests; `MissingExtra` when not installed."""
    try:
        import mlflow
        from mlflow import environment_variables as variables
    except ImportError:
        raise MissingExtra("tracking to MLflow (--mlflow, FLOWERML_MLFLOW_URI) needs the mlflow "
                           "extra: pip install 'flowerml[mlflow]'") from None
    # MLflow prints "View run ... at: URL" on stdout: it would break --json's output and show
    # the URI's user:pass@.
    variables.MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.set("true")
    # ...and logs its progress at INFO ("Waiting up to 300 seconds for model version..."):
    # our own lines say what the mirror did.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    if not variables.MLFLOW_HTTP_REQUEST_MAX_RETRIES.defined:
        variables.MLFLOW_HTTP_REQUEST_MAX_RETRIES.set("0")
    if not variables.MLFLOW_HTTP_REQUEST_TIMEOUT.defined:
        variables.MLFLOW_HTTP_REQUEST_TIMEOUT.set(str(REQUEST_TIMEOUT_SECONDS))
    return mlflow


def shown_uri(uri: str) -> str:
    """The tracking URI as a message may show it."""
    return redact_url(uri) if "://" in uri else uri


def failure_reason(error: BaseException) -> str:
    """Why a request to the server failed, in one short line without the URL's secrets."""
    text = " ".join(str(error).split())
    text = re.sub(r"[a-z][a-z0-9+.-]*://[^\s'\"]+", lambda m: shown_uri(m.group(0)), text,
                  flags=re.IGNORECASE)
    if "Connection refused" in text or "NewConnectionError" in text:
        return "connection refused"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "timed out"
    return text[:200] or type(error).__name__


def public_value(name: str, value: object) -> str | None:
    """`value` as an MLflow param or tag may hold it: None for a credential-like name, a URL
    without user:pass@ or query."""
    if SECRET_NAME.search(name):
        return None
    text = str(value)
    if URL_WITH_SECRETS.match(text):
        return redact_url(text)
    return text


def public_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flattened (`a.b`), stringified, credential-free params."""
    params: dict[str, str] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            params.update(public_params(value, f"{key}."))
            continue
        shown = public_value(key, value)
        if shown is not None:
            params[key] = shown[:6000]  # MLflow's limit on a param's value
    return params


@dataclass
class TrackingServer:
    """An MLflow tracking (and model registry) server, by URI."""

    uri: str

    @property
    def shown(self) -> str:
        return shown_uri(self.uri)

    @cached_property
    def client(self) -> MlflowClient:
        mlflow = import_mlflow()
        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def check_reachable(self) -> None:
        """`TrackingUnavailable` unless the server answers a request now."""
        client = self.client
        try:
            client.search_experiments(max_results=1)
        except Exception as error:  # MLflow raises requests', urllib3's and its own errors
            raise TrackingUnavailable(
                f"MLflow tracking server {self.shown} is unreachable ({failure_reason(error)}); "
                "start it, or set FLOWERML_MLFLOW_REQUIRED=false to train without "
                "tracking") from None

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created when missing (a concurrent creation is
        read back)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id


def connect(uri: str | None, *, required: bool) -> TrackingServer | None:
    """The tracking server at `uri`, checked to answer; None without a URI. An unreachable one
    raises `TrackingUnavailable` when `required`, else is logged as a warning and dropped."""
    if not uri:
        return None
    server = TrackingServer(uri)
    try:
        server.check_reachable()
    except TrackingUnavailable as error:
        if required:
            raise
        logging.getLogger(__name__).warning(
            "%s; training without tracking (FLOWERML_MLFLOW_REQUIRED=false)",
            str(error).split(";")[0])
        return None
    return server
