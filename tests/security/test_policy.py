"""The federation policy at a real pool process (``pool serve --policy FILE``, mutual TLS).

Each attack of issue 12 "Privacy not enforced" is one test: the pool refuses it with the
gRPC code and a reason naming the image index (or report key), the field and the value,
and keeps nothing of it.
"""

from __future__ import annotations

import json

import pytest

from tests.pool_support import PoolServer
from tests.security.support import (
    GEN,
    POLICY,
    assert_refused_and_clean,
    attempt,
    policy_site_dir,
    signed_raw,
    site_report,
    store_state,
    write_policy,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    policy = write_policy(work / "policy.json")
    with PoolServer(work / "store", pki.certs, work, extra=("--policy", str(policy))) as srv:
        yield srv
    print(srv.log())


def _edit_record(i: int, **fields):
    def edit(raw):
        rec = raw["images"][i]
        for k, v in fields.items():
            if k in ("tau_id", "tau_indep", "delta"):
                rec["thresholds"][k] = v
            else:
                rec[k] = v
    return edit


def _refused(pki, server, tmp_path, site, seed, code, want, edit=None, report=None, sign_edit=None):
    out = policy_site_dir(tmp_path / f"b{seed}", site, 4, seed=seed, report=report, edit=edit)
    signed = signed_raw(out, pki.site(site), sign_edit or (lambda raw: None))
    got = attempt(signed, pki.site(site), server.address)
    assert_refused_and_clean(server, signed, *got, code, want)
    return got


def test_bundle_within_the_policy_is_stored(pki, server, tmp_path):
    out = policy_site_dir(tmp_path / "ok", "site-a", 4, seed=1)
    signed = signed_raw(out, pki.site("site-a"), lambda raw: None)
    assert attempt(signed, pki.site("site-a"), server.address) == ("OK", "stored")
    ids, problems, _ = store_state(server.store)
    assert signed.bundle_id in ids and problems == []


def test_tau_id_1e300(pki, server, tmp_path):
    # The record passes its own (absurd) threshold: max_id_prob 1.0 < tau_id 1e300.
    _refused(pki, server, tmp_path, "site-a", 2, "INVALID_ARGUMENT",
             "images[0] (id 'site-a-2-00000'): key 'thresholds.tau_id' = 1e+300: must be a probability bound, "
             "a finite number in (0, 1]", sign_edit=_edit_record(0, tau_id=1e300, max_id_prob=1.0))


def test_delta_minus_1e300_with_dcr_0(pki, server, tmp_path):
    _refused(pki, server, tmp_path, "site-a", 3, "INVALID_ARGUMENT",
             "images[1] (id 'site-a-3-00001'): key 'thresholds.delta' = -1e+300: must be a distance, a finite "
             "number >= 0", sign_edit=_edit_record(1, delta=-1e300, dcr=0.0))


def test_negative_probability_under_a_bound(pki, server, tmp_path):
    _refused(pki, server, tmp_path, "site-a", 4, "INVALID_ARGUMENT",
             "images[2] (id 'site-a-4-00002'): key 'max_id_prob' = -3: must be a probability, a finite number "
             "in [0, 1]", sign_edit=_edit_record(2, max_id_prob=-3))


def test_thresholds_looser_than_the_policy(pki, server, tmp_path):
    _refused(pki, server, tmp_path, "site-b", 5, "FAILED_PRECONDITION",
             "images[3] (id 'site-b-5-00003'): tau_id 0.6 above the pool's bound 0.5",
             sign_edit=_edit_record(3, tau_id=0.6))


def test_method_not_allowed(pki, server, tmp_path):
    _refused(pki, server, tmp_path, "site-b", 6, "FAILED_PRECONDITION",
             "images[0] (id 'site-b-6-00000'): method 'random' not allowed by the federation's policy (plan, linear)",
             sign_edit=_edit_record(0, method="random"))


def test_label_99(pki, server, tmp_path):
    _refused(pki, server, tmp_path, "site-b", 7, "INVALID_ARGUMENT",
             "images[1] (id 'site-b-7-00001'): label 99 outside the federation's 2 classes [0, 1]",
             sign_edit=_edit_record(1, label=99))


def test_generator_not_the_federations(pki, server, tmp_path):
    other = "ab" * 32
    _refused(pki, server, tmp_path, "site-c", 8, "FAILED_PRECONDITION",
             f"bundle manifest: key 'generator_sha256' = {other[:16]}…: not the federation's final generator "
             f"{GEN[:16]}…", sign_edit=lambda raw: raw.update(generator_sha256=other))


def test_too_few_planted_duplicates(pki, server, tmp_path):
    _refused(pki, server, tmp_path, "site-c", 9, "FAILED_PRECONDITION",
             "report.json: key 'filter.planted_total' = 2: below the federation's min_planted 4",
             report=site_report(4, planted_total=2, planted_rejected=2))


def test_planted_duplicate_not_rejected(pki, server, tmp_path):
    _refused(pki, server, tmp_path, "site-c", 10, "FAILED_PRECONDITION",
             "report.json: key 'filter.planted_rejected' = 3: the policy needs all 4 planted duplicates rejected",
             report=site_report(4, planted_rejected=3))


def test_k_below_the_policy(pki, server, tmp_path):
    rep = site_report(4)
    rep["anchors"]["k"] = 2
    _refused(pki, server, tmp_path, "site-c", 11, "FAILED_PRECONDITION",
             "report.json: key 'anchors.k' = 2: below the federation's min_k 5", report=rep)


def test_bundle_without_report(pki, server, tmp_path):
    out = policy_site_dir(tmp_path / "norep", "site-c", 4, seed=12)
    (out / "report.json").unlink()
    signed = signed_raw(out, pki.site("site-c"), lambda raw: None)
    got = attempt(signed, pki.site("site-c"), server.address)
    assert_refused_and_clean(server, signed, *got, "FAILED_PRECONDITION",
                             "bundle has no report.json; the federation's policy checks its planted duplicates")


def test_pool_learns_the_final_generator_from_its_policy_file(pki, tmp_path):
    """Before the rounds end the pool refuses everything; the ServerApp's publish makes the bundle acceptable."""
    from plan_shared.policy import publish_generator

    work = tmp_path / "srv"
    work.mkdir()
    policy = write_policy(work / "policy.json", generator_sha256=None, image_size=None, channels=None,
                          num_classes=None, max_pixels=4096 * 4096)
    out = policy_site_dir(tmp_path / "b", "site-a", 4, seed=13)
    signed = signed_raw(out, pki.site("site-a"), lambda raw: None)
    with PoolServer(work / "store", pki.certs, work, extra=("--policy", str(policy))) as srv:
        got = attempt(signed, pki.site("site-a"), srv.address)
        assert_refused_and_clean(srv, signed, *got, "FAILED_PRECONDITION",
                                 "the federation's final generator is not known to the pool yet")
        # A broken policy file fails closed.
        policy.write_text("{")
        got = attempt(signed, pki.site("site-a"), srv.address)
        assert got[0] == "UNAVAILABLE" and f"pool misconfigured: {policy}: not valid JSON" in got[1]
        write_policy(policy, generator_sha256=None, image_size=None, channels=None, num_classes=None,
                     max_pixels=4096 * 4096)
        new = publish_generator(policy, GEN, channels=1, size=28, num_classes=2)
        assert (new.generator_sha256, new.image_size, new.channels, new.num_classes, new.max_pixels) == (
            GEN, 28, 1, 2, 784)
        assert json.loads(policy.read_text())["generator_sha256"] == GEN
        assert attempt(signed, pki.site("site-a"), srv.address) == ("OK", "stored")


def test_policy_from_config_and_file_round_trip(tmp_path):
    from plan_shared.config import config_from_dict
    from plan_shared.policy import PolicyFileError, policy_from_config, read_policy_file, write_policy_file

    cfg = config_from_dict({"anchors": {"k": 7}, "filter": {"tau_id": 0.4, "planted": 9},
                            "data": {"size": 28, "channels": 1}, "policy": {"max_tau_indep": 0.3},
                            "synthesis": {"method": "plan"}})  # autoexport: a forced method (auto = every method)
    p = policy_from_config(cfg, num_classes=2)
    assert (p.max_tau_id, p.max_tau_indep, p.min_k, p.min_planted, p.methods, p.image_size, p.channels,
            p.num_classes, p.max_pixels, p.generator_sha256) == (0.4, 0.3, 7, 9, ("plan",), 28, 1, 2, 784, None)
    path = write_policy_file(tmp_path / "p.json", p)
    assert read_policy_file(path) == p
    doc = json.loads(path.read_text())
    assert doc == dict(POLICY, max_tau_id=0.4, max_tau_indep=0.3, min_k=7, min_planted=9, methods=["plan"],
                       generator_sha256=None)
    path.write_text(json.dumps(dict(doc, max_tau_id=2.0)))
    with pytest.raises(PolicyFileError, match=r"key 'max_tau_id' = 2.0: Input should be less than or equal to 1"):
        read_policy_file(path)
    path.write_text(json.dumps(dict(doc, colour="red")))
    with pytest.raises(PolicyFileError, match="unknown key 'colour'"):
        read_policy_file(path)


def test_generator_digest_is_the_weights_alone():
    """Site (checkpoint written with its own config, reloaded) and coordinator (Flower record) agree."""
    import tempfile
    from pathlib import Path

    import torch

    from plan_shared.config import config_from_dict
    from plan_shared.gan import GanTrainer, generator_digest, load_generator
    from tests.test_federation_util import tiny_config

    glob = GanTrainer(config_from_dict(tiny_config()), 1, 8)
    g_ema = {k: v for k, v in glob.weights("g").items() if k.startswith("g_ema.")}
    coordinator = generator_digest(g_ema)
    digests = set()
    with tempfile.TemporaryDirectory() as d:
        for site in ("hospital-a", "hospital-b"):
            t = GanTrainer(config_from_dict(dict(tiny_config(), site_id=site)), 1, 8)
            t.set_weights(g_ema)
            ckpt = t.save_checkpoint(Path(d) / f"{site}.pt")
            digests.add(generator_digest(load_generator(ckpt)))
    assert digests == {coordinator}
    changed = dict(g_ema)
    k = next(iter(changed))
    changed[k] = changed[k].clone()
    changed[k].view(-1)[0] += 1e-3
    assert generator_digest(changed) != coordinator
    # What the site receives through Flower (ArrayRecord) hashes the same.
    from flwr.app import ArrayRecord

    assert generator_digest(ArrayRecord(g_ema).to_torch_state_dict()) == coordinator
    assert generator_digest({kk: v.to(torch.float64) for kk, v in g_ema.items()}) != coordinator


def test_serverapp_publishes_the_final_generator(tmp_path):
    """What coordinate/demo write before the rounds, and what the ServerApp adds before synthesis."""
    pytest.importorskip("flwr")
    from plan_shared.config import config_from_dict
    from plan_shared.gan import GanTrainer, generator_digest
    from plan_shared.policy import policy_from_config, read_policy_file, write_policy_file
    from server.post_training import publish_final_generator
    from tests.test_federation_util import tiny_config

    path = tmp_path / "pool-policy.json"
    raw = tiny_config()
    raw.update(pool={"policy_file": str(path)}, anchors={"k": 2}, filter={"planted": 4},
               data={"source": "medmnist", "size": None, "channels": None})  # the shape comes from the sites
    cfg = config_from_dict(raw)
    write_policy_file(path, policy_from_config(cfg))
    before = read_policy_file(path)
    assert before.generator_sha256 is None and before.require_generator and before.channels is None
    g_ema = {k: v for k, v in GanTrainer(cfg, 1, 16).weights("g").items() if k.startswith("g_ema.")}
    digest = publish_final_generator(cfg, g_ema, channels=1, size=16, num_classes=2)
    after = read_policy_file(path)
    assert digest == after.generator_sha256 == generator_digest(g_ema)
    assert (after.image_size, after.channels, after.num_classes, after.max_pixels) == (16, 1, 2, 256)
    assert (after.min_k, after.min_planted, after.max_tau_id) == (2, 4, 0.5)  # the coordinator's own settings
