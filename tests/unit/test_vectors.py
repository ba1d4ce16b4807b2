"""Known-answer tests: the KDF (wireguard-go), Noise_IKpsk2 (cacophony), TAI64N, the replay
window (the kernel's counter selftest). Vectors live in tests/vectors/*.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunnel.noise import crypto, tai64n
from tunnel.noise.handshake import SymmetricState
from transport.replay import WINDOW_SIZE, ReplayFilter

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


KDF = load("kdf.json")


@pytest.mark.parametrize("case", KDF["kdf1"], ids=lambda c: c["key_ascii"] or "empty")
def test_kdf1(case):
    out = crypto.kdf1(bytes.fromhex(case["key"]), bytes.fromhex(case["input"]))
    assert out.hex() == case["t0"]


@pytest.mark.parametrize("case", KDF["kdf2"], ids=lambda c: c["key_ascii"] or "empty")
def test_kdf2(case):
    t0, t1 = crypto.kdf2(bytes.fromhex(case["key"]), bytes.fromhex(case["input"]))
    assert (t0.hex(), t1.hex()) == (case["t0"], case["t1"])


@pytest.mark.parametrize("case", KDF["kdf3"], ids=lambda c: c["key_ascii"] or "empty")
def test_kdf3(case):
    t0, t1, t2 = crypto.kdf3(bytes.fromhex(case["key"]), bytes.fromhex(case["input"]))
    assert (t0.hex(), t1.hex(), t2.hex()) == (case["t0"], case["t1"], case["t2"])


def test_kdf_wrong_input_differs():
    case = KDF["kdf1"][0]
    assert crypto.kdf1(bytes.fromhex(case["key"]), b"other").hex() != case["t0"]


# --- Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, run through the same SymmetricState WireGuard uses.

NOISE = load("noise_ikpsk2.json")["vectors"]


def _run_ikpsk2(v: dict) -> tuple[list[bytes], bytes, bytes]:
    """Play both roles of the vector; returns the produced messages and both handshake hashes."""
    h = bytes.fromhex
    name = v["protocol_name"].encode()
    i_s, i_e, r_s, r_e = (h(v[k]) for k in ("init_static", "init_ephemeral", "resp_static", "resp_ephemeral"))
    psk = h(v["init_psks"][0])
    assert v["init_psks"] == v["resp_psks"]
    r_s_pub = crypto.public_key(r_s)
    assert h(v["init_remote_static"]) == r_s_pub
    msgs = v["messages"]

    ini = SymmetricState(name)
    ini.mix_hash(h(v["init_prologue"]))
    ini.mix_hash(r_s_pub)
    res = SymmetricState(name)
    res.mix_hash(h(v["resp_prologue"]))
    res.mix_hash(r_s_pub)

    # -> e, es, s, ss  (+ payload)
    e_pub = crypto.public_key(i_e)
    ini.mix_hash(e_pub)
    ini.mix_key(e_pub)
    ini.mix_key(crypto.dh(i_e, r_s_pub))
    enc_s = ini.encrypt_and_hash(crypto.public_key(i_s))
    ini.mix_key(crypto.dh(i_s, r_s_pub))
    m1 = e_pub + enc_s + ini.encrypt_and_hash(h(msgs[0]["payload"]))

    re_pub = m1[:32]
    res.mix_hash(re_pub)
    res.mix_key(re_pub)
    res.mix_key(crypto.dh(r_s, re_pub))
    rs_pub = res.decrypt_and_hash(m1[32:80])
    res.mix_key(crypto.dh(r_s, rs_pub))
    assert res.decrypt_and_hash(m1[80:]) == h(msgs[0]["payload"])

    # <- e, ee, se, psk  (+ payload)
    er_pub = crypto.public_key(r_e)
    res.mix_hash(er_pub)
    res.mix_key(er_pub)
    res.mix_key(crypto.dh(r_e, re_pub))
    res.mix_key(crypto.dh(r_e, rs_pub))
    res.mix_key_and_hash(psk)
    m2 = er_pub + res.encrypt_and_hash(h(msgs[1]["payload"]))

    ini.mix_hash(m2[:32])
    ini.mix_key(m2[:32])
    ini.mix_key(crypto.dh(i_e, m2[:32]))
    ini.mix_key(crypto.dh(i_s, m2[:32]))
    ini.mix_key_and_hash(psk)
    assert ini.decrypt_and_hash(m2[32:]) == h(msgs[1]["payload"])

    out = [m1, m2]
    i_send, i_recv = ini.split()
    r_recv, r_send = res.split()
    assert (i_send, i_recv) == (r_recv, r_send)
    counters = {"i": 0, "r": 0}
    for n, m in enumerate(msgs[2:]):
        who = "i" if n % 2 == 0 else "r"
        key = i_send if who == "i" else r_send
        out.append(crypto.aead_seal(key, counters[who], h(m["payload"]), b""))
        counters[who] += 1
    return out, ini.h, res.h


@pytest.mark.parametrize("vector", NOISE, ids=lambda v: v["protocol_name"])
def test_noise_ikpsk2_vector(vector):
    produced, h_init, h_resp = _run_ikpsk2(vector)
    assert [m.hex() for m in produced] == [m["ciphertext"] for m in vector["messages"]]
    assert h_init.hex() == h_resp.hex() == vector["handshake_hash"]


def test_noise_ikpsk2_wrong_psk_fails():
    v = dict(NOISE[0])
    v["resp_psks"] = ["00" * 32]
    v["init_psks"] = ["00" * 32]
    produced, _, _ = _run_ikpsk2(v)
    assert produced[1].hex() != v["messages"][1]["ciphertext"]


# --- TAI64N

TAI = load("tai64n.json")


@pytest.mark.parametrize("entry", TAI["entries"], ids=lambda e: f"{e['unix_seconds']}.{e['nanoseconds']}")
def test_tai64n_encoding(entry):
    raw = tai64n.encode(entry["unix_seconds"], entry["nanoseconds"])
    assert raw.hex() == entry["raw_hex"]
    whitened = tai64n.encode(entry["unix_seconds"], tai64n.whiten(entry["nanoseconds"]))
    assert whitened.hex() == entry["wireguard_hex"]
    assert tai64n.decode(raw) == (entry["unix_seconds"], entry["nanoseconds"])


@pytest.mark.parametrize("case", TAI["ordering_cases"], ids=lambda c: c["name"])
def test_tai64n_ordering(case):
    t1 = tai64n.encode(case["t1"]["unix_seconds"], tai64n.whiten(case["t1"]["nanoseconds"]))
    t2 = tai64n.encode(case["t2"]["unix_seconds"], tai64n.whiten(case["t2"]["nanoseconds"]))
    assert (t2 > t1) == case["want_after"]


def test_tai64n_stamp_from_float():
    ts = tai64n.stamp(1_700_000_000.5)
    secs, nanos = tai64n.decode(ts)
    assert secs == 1_700_000_000
    assert nanos == tai64n.whiten(500_000_000)
    assert tai64n.stamp(1_700_000_001.0) > ts


def test_tai64n_rejects_bad_nanoseconds():
    with pytest.raises(ValueError):
        tai64n.encode(0, 1_000_000_000)


# --- Replay window: the kernel's counter selftest sequence

REPLAY = load("replay.json")


def test_window_size_matches_kernel():
    assert WINDOW_SIZE == REPLAY["constants"]["windowSize"] == 8128


@pytest.mark.parametrize("variant", sorted(REPLAY["variants"]))
def test_replay_sequence(variant):
    spec = REPLAY["variants"][variant]
    limit = spec["limit"]
    f = ReplayFilter()
    checks = 0
    for step in spec["steps"]:
        op = step["op"]
        if op == "reset":
            f.reset()
        elif op == "check":
            got = f.check_and_update(step["counter"], limit)
            assert got == step["expected"], f"{variant} step {step.get('test_number', '')} ({step['expr']})"
            checks += 1
        elif op == "loop":
            for i in range(step["first"], step["last"] + step["step"], step["step"]):
                assert f.check_and_update(i, limit) == step["expected"], f"{variant} loop {step['expr']} at {i}"
                checks += 1
        else:
            raise AssertionError(f"unknown op {op}")
    assert checks > 40000
