#!/bin/sh
# Regenerates the certificate fixtures of control/src/ike/auth_tests.rs with
# openssl (3.0 or later). Run it in this directory: ./gen.sh
#
#   ca-rsa    RSA 2048 root        ca-p256  ECDSA P-256 root
#   ca-p384   ECDSA P-384 root     ca-other ECDSA P-256 root nobody trusts
#   int-p256  intermediate under ca-p256
#
#   left-rsa, right-rsa     RSA 2048 under ca-rsa (left-rsa's key traditional
#                           "RSA PRIVATE KEY", right-rsa's PKCS#8)
#   left-p256, right-p256   P-256 under ca-p256 (right-p256's key traditional
#                           "EC PRIVATE KEY", left-p256's PKCS#8)
#   right-p384              P-384 under ca-p384
#   chain-p256              P-256 under int-p256; the .pem holds the leaf, then int-p256
#   expired-p256            P-256 under ca-p256, valid 2020-2021 only
#   other-p256              P-256 under ca-other
#
# Every end-entity certificate names C=CH, O=bitw test, CN=<name> and carries
# the SANs DNS:<name>.bitw.test, email:<name>@bitw.test and an address:
# left-* 10.0.0.1 (and fd00::1), everything else 10.0.0.2 (and fd00::2).
#
# <ca>.spki-sha1 is the SHA-1 of a CA's SubjectPublicKeyInfo (CERTREQ).
# kat.bin is a stand-in for signed octets; kat-rsa.sig and kat-p256.sig are
# openssl's signatures of it (RSA PKCS#1 v1.5 SHA-256 with left-rsa's key,
# ECDSA SHA-256 DER with left-p256's key); kat-rsa-sha1.sig RSA PKCS#1 v1.5
# SHA-1 with left-rsa's key (auth method 1).
set -eu
cd "$(dirname "$0")"
DAYS=7300

rm -f ./*.pem ./*.sig ./*.spki-sha1 kat.bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

genkey() { # file type
    case $2 in
        rsa) openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null ;;
        p256) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" ;;
        p384) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$1" ;;
    esac
}

ca() { # name type [issuer]
    genkey "$1.key.pem" "$2"
    printf 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n' >"$tmp/ca.ext"
    if [ $# -eq 2 ]; then
        openssl req -x509 -new -key "$1.key.pem" -out "$1.pem" -days $DAYS -sha256 \
            -subj "/C=CH/O=bitw test/CN=bitw test $1" \
            -addext basicConstraints=critical,CA:TRUE \
            -addext keyUsage=critical,keyCertSign,cRLSign \
            -addext subjectKeyIdentifier=hash
    else
        openssl req -new -key "$1.key.pem" -out "$tmp/$1.csr" -subj "/C=CH/O=bitw test/CN=bitw test $1"
        printf 'authorityKeyIdentifier=keyid\n' >>"$tmp/ca.ext"
        openssl x509 -req -in "$tmp/$1.csr" -CA "$3.pem" -CAkey "$3.key.pem" -set_serial 0x77 \
            -days $DAYS -sha256 -extfile "$tmp/ca.ext" -out "$1.pem" 2>/dev/null
    fi
    # what a CERTREQ names the CA by (RFC 7296 §3.7)
    openssl x509 -in "$1.pem" -noout -pubkey | openssl pkey -pubin -outform DER |
        openssl dgst -sha1 -binary >"$1.spki-sha1"
}

serial=4096
ee() { # name type issuer [- startdate enddate]
    name=$1
    genkey "$name.key.pem" "$2"
    case $name in left*) ip=10.0.0.1 ip6=fd00::1 ;; *) ip=10.0.0.2 ip6=fd00::2 ;; esac
    openssl req -new -key "$name.key.pem" -out "$tmp/$name.csr" -subj "/C=CH/O=bitw test/CN=$name"
    cat >"$tmp/$name.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
authorityKeyIdentifier=keyid
subjectAltName=DNS:$name.bitw.test,email:$name@bitw.test,IP:$ip,IP:$ip6
EOF
    serial=$((serial + 1))
    if [ $# -ge 5 ]; then
        # openssl x509 -req cannot date a certificate in the past; openssl ca can
        mkdir -p "$tmp/db"
        : >"$tmp/db/index.txt"
        printf '%x\n' $serial >"$tmp/db/serial"
        cat >"$tmp/ca.cnf" <<EOF
[ca]
default_ca = d
[d]
dir = $tmp/db
database = \$dir/index.txt
new_certs_dir = \$dir
serial = \$dir/serial
default_md = sha256
policy = p
unique_subject = no
copy_extensions = none
[p]
commonName = supplied
EOF
        openssl ca -batch -config "$tmp/ca.cnf" -cert "$3.pem" -keyfile "$3.key.pem" \
            -startdate "$5" -enddate "$6" -notext -preserveDN -extfile "$tmp/$name.ext" \
            -in "$tmp/$name.csr" -out "$name.pem" 2>/dev/null
    else
        openssl x509 -req -in "$tmp/$name.csr" -CA "$3.pem" -CAkey "$3.key.pem" \
            -set_serial $serial -days $DAYS -sha256 -extfile "$tmp/$name.ext" \
            -out "$name.pem" 2>/dev/null
    fi
}

ca ca-rsa rsa
ca ca-p256 p256
ca ca-p384 p384
ca ca-other p256
ca int-p256 p256 ca-p256

ee left-rsa rsa ca-rsa
ee right-rsa rsa ca-rsa
ee left-p256 p256 ca-p256
ee right-p256 p256 ca-p256
ee right-p384 p384 ca-p384
ee chain-p256 p256 int-p256
cat int-p256.pem >>chain-p256.pem
ee expired-p256 p256 ca-p256 - 20200101000000Z 20210101000000Z
ee other-p256 p256 ca-other

# the traditional formats (openssl genpkey writes PKCS#8)
openssl rsa -in left-rsa.key.pem -traditional -out "$tmp/k" 2>/dev/null && mv "$tmp/k" left-rsa.key.pem
openssl ec -in right-p256.key.pem -out "$tmp/k" 2>/dev/null && mv "$tmp/k" right-p256.key.pem

printf 'signed octets stand-in: bitw IKEv2 AUTH known answer\n' >kat.bin
openssl dgst -sha256 -sign left-rsa.key.pem -out kat-rsa.sig kat.bin
openssl dgst -sha256 -sign left-p256.key.pem -out kat-p256.sig kat.bin
openssl dgst -sha1 -sign left-rsa.key.pem -out kat-rsa-sha1.sig kat.bin
rm -f int-p256.key.pem.srl ./*.srl
echo "certificates written to $(pwd)"
