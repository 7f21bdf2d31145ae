"""TLS on both surfaces (OPD_TLS_CERT / OPD_TLS_KEY / OPD_TLS_CLIENT_CA) with throwaway CAs.

The teacher serves https:// and grpcs:// on loopback; the client verifies it with a CA bundle.
Failures must say what is wrong: plaintext to a TLS port, a CA that did not sign the server's
certificate, a missing client certificate under mutual TLS, bad files at start-up.
"""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from opd_client import TLS, AsyncTeacherClient, RetryPolicy, TeacherClient, Unavailable
from opd_services.config import Settings, check_tls
from opd_services.errors import ConfigError
from opd_services.teacher.engines.uniform_engine import UniformEngine
from opd_services.teacher.server import BackgroundTeacher

from tls_helpers import CA

V = 64
ONE_TRY = RetryPolicy(attempts=1)
SEQS = [[1, 2, 3, 4], [5, 6, 7]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CA(folder, "opd-test-ca"), CA(folder, "some-other-ca")
    return {"ca": ca.pem.cert, "server": ca.issue("teacher", server=True), "client": ca.issue("trainer", server=False),
            "other_ca": other.pem.cert, "other_client": other.issue("stranger", server=False)}


def _teacher(settings: Settings, **tls) -> BackgroundTeacher:
    s = settings.model_copy(update=tls)
    return BackgroundTeacher(s, engine=lambda: UniformEngine(vocab_size=V, max_model_len=128)).start()


@pytest.fixture(scope="module")
def tls_teacher(settings, pki):
    t = _teacher(settings, tls_cert=pki["server"].cert, tls_key=pki["server"].key)
    yield t
    t.stop()


@pytest.fixture(scope="module")
def mtls_teacher(settings, pki):
    t = _teacher(settings, tls_cert=pki["server"].cert, tls_key=pki["server"].key, tls_client_ca=pki["ca"])
    yield t
    t.stop()


def _check(resp) -> None:
    assert [len(r.logprobs_T) for r in resp.results] == [3, 2]
    for r in resp.results:
        np.testing.assert_allclose(r.logprobs_T, -np.log(V), rtol=1e-6)


def test_both_surfaces_score_over_tls(tls_teacher, pki):
    assert tls_teacher.http_url.startswith("https://") and tls_teacher.grpc_url.startswith("grpcs://")
    for url in (tls_teacher.http_url, tls_teacher.grpc_url):
        with TeacherClient(url, tls=TLS(ca=pki["ca"])) as c:
            _check(c.score(SEQS))

    async def both():
        for url in (tls_teacher.http_url, tls_teacher.grpc_url):
            async with AsyncTeacherClient(url, tls=TLS(ca=pki["ca"])) as c:
                _check(await c.score(SEQS))
    asyncio.run(both())


@pytest.mark.parametrize("surface", ["http", "grpc"])
def test_plaintext_to_a_tls_port_fails_clearly(tls_teacher, surface):
    url = getattr(tls_teacher, f"{surface}_url").replace("https://", "http://").replace("grpcs://", "grpc://")
    with TeacherClient(url, retry=ONE_TRY, timeout=5) as c, pytest.raises(Unavailable) as e:
        c.score(SEQS)
    assert "https:// or grpcs://" in str(e.value)


@pytest.mark.parametrize("surface", ["http", "grpc"])
def test_wrong_ca_fails_clearly_and_is_not_retried(tls_teacher, pki, surface):
    url = getattr(tls_teacher, f"{surface}_url")
    with TeacherClient(url, tls=TLS(ca=pki["other_ca"]), timeout=5,
                       retry=RetryPolicy(attempts=4, backoff_s=5)) as c, pytest.raises(Unavailable) as e:
        c.score(SEQS)
    msg = str(e.value)
    assert msg.startswith("TLS: ") and "OPD_TLS_CA" in msg, msg   # no backoff of 5 s x 3: raised at once


@pytest.mark.parametrize("surface", ["http", "grpc"])
def test_mutual_tls_refuses_a_client_without_certificate(mtls_teacher, pki, surface):
    url = getattr(mtls_teacher, f"{surface}_url")
    for tls in (TLS(ca=pki["ca"]), TLS(ca=pki["ca"], cert=pki["other_client"].cert, key=pki["other_client"].key)):
        with TeacherClient(url, tls=tls, retry=ONE_TRY, timeout=5) as c, pytest.raises(Unavailable) as e:
            c.score(SEQS)
        assert "OPD_TLS_CLIENT_CERT" in str(e.value)
    with TeacherClient(url, tls=TLS(ca=pki["ca"], cert=pki["client"].cert, key=pki["client"].key)) as c:
        _check(c.score(SEQS))


def test_mutual_tls_at_the_socket(mtls_teacher, pki):
    """The HTTP port itself (not only our client) refuses a handshake without a client certificate."""
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{mtls_teacher.http_url}/healthz", verify=TLS(ca=pki["ca"]).ssl_context(), timeout=5)
    ok = TLS(ca=pki["ca"], cert=pki["client"].cert, key=pki["client"].key).ssl_context()
    assert httpx.get(f"{mtls_teacher.http_url}/healthz", verify=ok, timeout=5).status_code == 200


def test_settings_refuse_bad_tls_files(pki, tmp_path, monkeypatch):
    srv, cli = pki["server"], pki["client"]
    cases = [
        ({"tls_cert": tmp_path / "nope.pem", "tls_key": srv.key}, "OPD_TLS_CERT=", "no such file"),
        ({"tls_cert": srv.cert, "tls_key": cli.key}, "OPD_TLS_KEY=", "does not belong"),
        ({"tls_cert": srv.cert}, "OPD_TLS_KEY is unset", "go together"),
        ({"tls_client_ca": pki["ca"]}, "OPD_TLS_CLIENT_CA=", "OPD_TLS_CERT"),
        ({"tls_cert": srv.cert, "tls_key": srv.key, "tls_client_ca": srv.key}, "OPD_TLS_CLIENT_CA=", "not a PEM"),
        ({"tls_ca": tmp_path / "missing-ca.pem"}, "OPD_TLS_CA=", "no such file"),
        ({"tls_client_cert": cli.cert, "tls_client_key": srv.key}, "OPD_TLS_CLIENT_KEY=", "does not belong"),
    ]
    for overrides, var, reason in cases:
        with pytest.raises(ConfigError) as e:
            check_tls(Settings.load(**overrides))
        assert var in str(e.value) and reason in str(e.value), (overrides, str(e.value))
    monkeypatch.setenv("OPD_TLS_CERT", str(srv.cert))
    monkeypatch.setenv("OPD_TLS_KEY", str(srv.key))
    check_tls(Settings.load())
    assert Settings.load().tls
