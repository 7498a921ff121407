#!/usr/bin/env python3
"""Independent known-answer vectors for control/src/ike/{dh,crypto}.rs.

Written from the RFC text with Python's standard library (pow, hmac, hashlib)
and the `cryptography` package (AES-CBC, AES-GCM, ChaCha20-Poly1305 only),
never from the Rust code, so the Rust tests compare two implementations.
Run from anywhere:

    python3 control/src/ike/testdata/ike_kat.py    # rewrites ike_kat.txt

Every input is deterministic (SHA-256 of a label), so rerunning gives the same
file; `git diff` shows whether anything changed. Before writing, the script
checks its own key-schedule formulas against a vector published by another
implementation (libreswan's CAVS-format IKEv2 KDF example, HMAC-SHA1), so a
misreading of RFC 7296 shared by this script and the Rust code would show.
The DH shared secrets fed into the key schedules are the published RFC 5903 /
RFC 7748 values, so the chain RFC vector -> SKEYSEED -> SK_* is covered end to
end.
"""
import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = []


def emit(name, data):
    OUT.append(f"{name} = {data.hex()}")


def comment(text):
    OUT.append("")
    OUT.append(f"# {text}")


def det_bytes(label, n):
    """n deterministic bytes: SHA-256 in counter mode over a label."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(label.encode() + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:n]


# ---------------------------------------------------------------- group 14
def pi_fixed(bits):
    """floor(pi * 2^bits) by Machin's formula in integer arithmetic."""
    guard = 64
    one = 1 << (bits + guard)

    def arctan_inv(x):
        total, term, k, sign = 0, one // x, 1, 1
        x2 = x * x
        while term:
            total += sign * (term // k)
            term //= x2
            k += 2
            sign = -sign
        return total

    return (16 * arctan_inv(5) - 4 * arctan_inv(239)) >> guard


# RFC 3526 section 3: p = 2^2048 - 2^1984 - 1 + 2^64 * ( [2^1918 pi] + 124476 )
P = 2**2048 - 2**1984 - 1 + 2**64 * (pi_fixed(1918) + 124476)


def modp2048_vector():
    assert pow(2, (P - 1) // 2, P) == 1  # 2 lies in the prime-order subgroup
    assert pow(3, P - 1, P) == 1  # Fermat: p is (very probably) prime
    comment("Group 14: p from RFC 3526's formula (pi by Machin), g = 2, Python pow().")
    emit("modp2048_p", P.to_bytes(256, "big"))
    x = int.from_bytes(det_bytes("bitw modp2048 x", 256), "big") % (P - 3) + 2
    y = int.from_bytes(det_bytes("bitw modp2048 y", 256), "big") % (P - 3) + 2
    gx, gy = pow(2, x, P), pow(2, y, P)
    gxy = pow(gy, x, P)
    assert gxy == pow(gx, y, P)
    for name, v in [("x", x), ("gx", gx), ("y", y), ("gy", gy), ("gxy", gxy)]:
        emit(f"modp2048_{name}", v.to_bytes(256, "big"))
    return gxy.to_bytes(256, "big")


# ---------------------------------------------------------------- RFC 7296
HASH = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


def prf(h, key, data):
    return hmac.new(key, data, HASH[h]).digest()


def prf_plus(h, key, seed, length):
    """RFC 7296 section 2.13: T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n)."""
    out, t, n = b"", b"", 1
    while len(out) < length:
        assert n <= 255
        t = prf(h, key, t + seed + bytes([n]))
        out += t
        n += 1
    return out[:length]


def split(data, lengths):
    parts, at = [], 0
    for n in lengths:
        parts.append(data[at : at + n])
        at += n
    assert at == len(data)
    return parts


# RFC 5903 section 8.1 / 8.2 girx and RFC 7748 section 6.1 K (published values).
ECP256_GIRX = bytes.fromhex(
    "D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE")
ECP384_GIRX = bytes.fromhex(
    "11187331C279962D93D604243FD592CB9D0A926F422E47187521287E7156C5C4"
    "D603135569B9E9D09CF5D4A270F59746")
X25519_K = bytes.fromhex(
    "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def key_schedule(tag, h, enc_len, integ_len, gir, ni_len, nr_len, child, rekey_gir):
    """One IKE SA: SKEYSEED, the seven SK_*, a CREATE_CHILD_SA KEYMAT and a
    rekey SKEYSEED. `child` = (esp encryption key length incl. salt, esp
    integrity key length, with a new DH?)."""
    prf_len = len(prf(h, b"", b""))
    ni = det_bytes(f"bitw {tag} Ni", ni_len)
    nr = det_bytes(f"bitw {tag} Nr", nr_len)
    spi_i = det_bytes(f"bitw {tag} SPIi", 8)
    spi_r = det_bytes(f"bitw {tag} SPIr", 8)
    emit(f"{tag}_ni", ni)
    emit(f"{tag}_nr", nr)
    emit(f"{tag}_spi_i", spi_i)
    emit(f"{tag}_spi_r", spi_r)
    emit(f"{tag}_g_ir", gir)
    # SKEYSEED = prf(Ni | Nr, g^ir)
    skeyseed = prf(h, ni + nr, gir)
    emit(f"{tag}_skeyseed", skeyseed)
    # {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr)
    lengths = [prf_len, integ_len, integ_len, enc_len, enc_len, prf_len, prf_len]
    keymat = prf_plus(h, skeyseed, ni + nr + spi_i + spi_r, sum(lengths))
    names = ["sk_d", "sk_ai", "sk_ar", "sk_ei", "sk_er", "sk_pi", "sk_pr"]
    keys = dict(zip(names, split(keymat, lengths)))
    for name in names:
        emit(f"{tag}_{name}", keys[name])
    # CREATE_CHILD_SA: KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr), with the
    # exchange's own nonces; i->r encryption, i->r integrity, r->i ..., r->i ...
    c_enc, c_integ, with_dh = child
    c_ni = det_bytes(f"bitw {tag} child Ni", 32)
    c_nr = det_bytes(f"bitw {tag} child Nr", 32)
    emit(f"{tag}_child_ni", c_ni)
    emit(f"{tag}_child_nr", c_nr)
    seed = (rekey_gir if with_dh else b"") + c_ni + c_nr
    child_keymat = prf_plus(h, keys["sk_d"], seed, 2 * (c_enc + c_integ))
    ei, ai, er, ar = split(child_keymat, [c_enc, c_integ, c_enc, c_integ])
    emit(f"{tag}_child_encr_i", ei)
    emit(f"{tag}_child_integ_i", ai)
    emit(f"{tag}_child_encr_r", er)
    emit(f"{tag}_child_integ_r", ar)
    # Rekeying the IKE SA: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)
    emit(f"{tag}_rekey_g_ir", rekey_gir)
    emit(f"{tag}_rekey_skeyseed", prf(h, keys["sk_d"], rekey_gir + c_ni + c_nr))
    return dict(keys, ni=ni, nr=nr, spi_i=spi_i, spi_r=spi_r)


def ike_header(spi_i, spi_r, exchange, flags, message_id, total_len):
    """RFC 7296 section 3.1: SPIs, next payload SK (46), version 2.0."""
    return (spi_i + spi_r + bytes([46, 0x20, exchange, flags])
            + message_id.to_bytes(4, "big") + total_len.to_bytes(4, "big"))


def sk_cbc_hmac(tag, keys, aes_bits, h, icv_len, plaintext):
    """RFC 7296 section 3.14 with AES-CBC + HMAC-SHA2 (RFC 4868, truncated)."""
    iv = det_bytes(f"bitw {tag} sk iv", 16)
    pad_len = (16 - (len(plaintext) + 1) % 16) % 16
    padded = plaintext + bytes(pad_len) + bytes([pad_len])
    body_len = 16 + len(padded) + icv_len
    payload_len = 4 + body_len
    # IKE_AUTH (exchange 35), initiator flag, message ID 1; the SK generic
    # header's next payload is the first inner payload, IDi (35).
    aad = ike_header(keys["spi_i"], keys["spi_r"], 35, 0x08, 1, 28 + payload_len)
    aad += bytes([35, 0]) + payload_len.to_bytes(2, "big")
    enc = Cipher(algorithms.AES(keys["sk_ei"]), modes.CBC(iv)).encryptor()
    ct = enc.update(padded) + enc.finalize()
    icv = hmac.new(keys["sk_ai"], aad + iv + ct, HASH[h]).digest()[:icv_len]
    emit(f"{tag}_sk_plaintext", plaintext)
    emit(f"{tag}_sk_iv", iv)
    emit(f"{tag}_sk_aad", aad)
    emit(f"{tag}_sk_body", iv + ct + icv)


def sk_aead(tag, keys, make, plaintext):
    """RFC 5282 (AES-GCM) / RFC 7634 (ChaCha20-Poly1305): nonce = salt | IV,
    AAD = IKE header | SK generic header, plaintext | pad length 0."""
    iv = det_bytes(f"bitw {tag} sk iv", 8)
    key, salt = keys["sk_ei"][:-4], keys["sk_ei"][-4:]
    padded = plaintext + bytes([0])
    body_len = 8 + len(padded) + 16
    payload_len = 4 + body_len
    aad = ike_header(keys["spi_i"], keys["spi_r"], 35, 0x08, 1, 28 + payload_len)
    aad += bytes([35, 0]) + payload_len.to_bytes(2, "big")
    sealed = make(key).encrypt(salt + iv, padded, aad)
    emit(f"{tag}_sk_plaintext", plaintext)
    emit(f"{tag}_sk_iv", iv)
    emit(f"{tag}_sk_aad", aad)
    emit(f"{tag}_sk_body", iv + sealed)


def auth_psk(tag, h, keys, psk):
    """RFC 7296 section 2.15: AUTH = prf(prf(PSK, "Key Pad for IKEv2"),
    <RealMessage1> | NonceRData | prf(SK_pi, RestOfInitIDPayload))."""
    message = det_bytes(f"bitw {tag} IKE_SA_INIT request", 300)
    # ID payload body: ID type FQDN (2), three reserved octets, the FQDN.
    id_body = bytes([2, 0, 0, 0]) + b"terminal-7.example.net"
    signed = message + keys["nr"] + prf(h, keys["sk_pi"], id_body)
    emit(f"{tag}_auth_message", message)
    emit(f"{tag}_auth_id_body", id_body)
    emit(f"{tag}_auth_psk", psk)
    emit(f"{tag}_auth_signed_octets", signed)
    emit(f"{tag}_auth_value", prf(h, prf(h, psk, b"Key Pad for IKEv2"), signed))


def self_check_against_libreswan():
    """Before emitting anything, check this file's prf, prf+, SKEYSEED, Child
    SA KEYMAT and rekey SKEYSEED against values another implementation
    published: the CAVS-format IKEv2 KDF example in libreswan's
    programs/ikev2kdf_cavs (NSS underneath), PRF HMAC-SHA1, DKM length 132."""
    HASH["sha1"] = hashlib.sha1
    h = "sha1"
    gir = bytes.fromhex("4b2c1f971981a8ad8d0abeafabf38cf75fc8349c148142465ed9c8b516b8be52")
    gir_new = bytes.fromhex("863f3c9d06efd39d2b907b97f8699e5dd5251ef64a2a176f36ee40c87d4f9330")
    ni, nr = bytes.fromhex("32b50d5f4a3763f3"), bytes.fromhex("9206a04b26564cb1")
    spi_i, spi_r = bytes.fromhex("34c9e7c188868785"), bytes.fromhex("3ff77d760d2b2199")
    skeyseed = prf(h, ni + nr, gir)
    assert skeyseed.hex() == "a9a7b222b59f8f48645f28a1db5b5f5d7479cba7"
    dkm = prf_plus(h, skeyseed, ni + nr + spi_i + spi_r, 132)
    assert dkm.hex() == (
        "a14293677cc80ff8f9cc0eee30d895da9d8f405666e30ef0dfcb63c634a46002"
        "a2a63080e514a062768b76606f9fa5e992204fc5a670bde3f10d6b027113936a"
        "5c55b648a194ae587b0088d52204b702c979fa280870d2ed41efa9c549fd1119"
        "8af1670b143d384bd275c5f594cf266b05ebadca855e4249520a441a81157435"
        "a7a56cc4")
    sk_d = dkm[:20]
    assert prf_plus(h, sk_d, ni + nr, 132).hex() == (
        "8059e3ee8810e6c3a91bc8bcd2a7a41151b8d0e6ae239c7b38093ad85ef4c581"
        "1a8e7b5d1cdabd9560b2d5e092d1f24e2d4b85eccdf0ad0dc9abd94b51ee7181"
        "4ca6dbc8bb51b6309f5b9545c7eb35cf5580b1e521a8fe20754a2d883ba0c2cf"
        "285f524aea6545b33106bc03e614296d319d41d4b50b3f510b1c0a22f3e66499"
        "4d234cb4")
    assert prf_plus(h, sk_d, gir_new + ni + nr, 132).hex() == (
        "bb43244c1860ad65ee1e211ffe8bb3661750c8f89cb9f547df7f4fa61d373016"
        "28190e38c66232eab4b3ab14c400a5197dd3730ed4820a8a10394d51e1c04000"
        "52f63ebd36b0e7ef53aaed31eba4a5080d7d4b5666023a8bbb5ffb7857240f9a"
        "05884d1b7d2f933708450b7b3288f1fc863ab49fa901227cffc06e27899c7054"
        "d56fd74c")
    assert prf(h, sk_d, gir_new + ni + nr).hex() == "63e81194946ebd05df7df5ebf5d8750056bf1f1d"


def main():
    self_check_against_libreswan()
    modp_gxy = modp2048_vector()

    comment("prf+ (RFC 7296 section 2.13) with PRF-HMAC-SHA2-256, 1000 octets (32 blocks).")
    k = det_bytes("bitw prf+ key", 32)
    s = det_bytes("bitw prf+ seed", 50)
    emit("prfplus_key", k)
    emit("prfplus_seed", s)
    emit("prfplus_out", prf_plus("sha256", k, s, 1000))

    comment("Suite A: AES-CBC-256, HMAC-SHA2-256-128, PRF-HMAC-SHA2-256; g^ir = RFC 5903 8.1 girx."
            " Child: ESP AES-CBC-128 + HMAC-SHA2-256-128 with a new DH (g^ir new = RFC 7748 K).")
    a = key_schedule("a", "sha256", 32, 32, ECP256_GIRX, 32, 32, (16, 32, True), X25519_K)
    sk_cbc_hmac("a", a, 256, "sha256", 16, det_bytes("bitw a inner payloads", 61))
    auth_psk("a", "sha256", a, b"correct horse battery staple")

    comment("Suite B: AES-GCM-16-256, PRF-HMAC-SHA2-384; g^ir = RFC 5903 8.2 girx."
            " Child: ESP AES-GCM-16-128 (key + salt), no new DH.")
    b = key_schedule("b", "sha384", 36, 0, ECP384_GIRX, 48, 48, (20, 0, False), X25519_K)
    sk_aead("b", b, AESGCM, det_bytes("bitw b inner payloads", 77))

    comment("Suite C: ChaCha20-Poly1305, PRF-HMAC-SHA2-512; g^ir = the group 14 vector above;"
            " Ni | Nr = 144 octets, longer than SHA-512's block, so HMAC hashes the key."
            " Child: ESP AES-CBC-256 + HMAC-SHA2-512-256, no new DH.")
    c = key_schedule("c", "sha512", 36, 0, modp_gxy, 64, 80, (32, 64, False), ECP256_GIRX)
    sk_aead("c", c, ChaCha20Poly1305, det_bytes("bitw c inner payloads", 16))

    comment("Suite D: AES-CBC-128, HMAC-SHA2-384-192, PRF-HMAC-SHA2-384; g^ir = RFC 7748 K.")
    d = key_schedule("d", "sha384", 16, 48, X25519_K, 16, 16, (36, 0, True), ECP384_GIRX)
    sk_cbc_hmac("d", d, 128, "sha384", 24, b"")

    comment("Suite E: AES-CBC-256, HMAC-SHA2-512-256, PRF-HMAC-SHA2-512; g^ir = RFC 5903 8.1 girx.")
    e = key_schedule("e", "sha512", 32, 64, ECP256_GIRX, 32, 32, (20, 0, False), X25519_K)
    sk_cbc_hmac("e", e, 256, "sha512", 32, det_bytes("bitw e inner payloads", 32))

    comment("Suite F: AES-GCM-16-128, PRF-HMAC-SHA2-256; g^ir = RFC 7748 K.")
    f = key_schedule("f", "sha256", 20, 0, X25519_K, 32, 32, (20, 0, False), X25519_K)
    sk_aead("f", f, AESGCM, det_bytes("bitw f inner payloads", 200))

    with open(os.path.join(HERE, "ike_kat.txt"), "w") as out:
        out.write("# Generated by ike_kat.py (independent Python implementation); do not edit.\n")
        out.write("\n".join(OUT).lstrip("\n") + "\n")


if __name__ == "__main__":
    main()
