"""Makes a throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate,
as PEM files, with the `cryptography` package (installed with moto)."""
import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject_cn, key, issuer_name, issuer_key, ca=False, server=False, names=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
         .issuer_name(issuer_name)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        elif names:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make(directory, name="tron"):
    """Writes ca.pem, server.pem, server.key, client.pem, client.key (no host name: a certificate
    a fleet shares), host-a.pem, host-a.key (a client certificate naming host `host-a`); returns
    their paths."""
    os.makedirs(directory, exist_ok=True)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name + " test CA")])
    ca = _cert(name + " test CA", ca_key, ca_name, ca_key, ca=True)
    server_key, client_key = _key(), _key()
    server = _cert("localhost", server_key, ca_name, ca_key, server=True)
    client = _cert(name + "-agent", client_key, ca_name, ca_key)
    host_a_key = _key()
    host_a = _cert("host-a", host_a_key, ca_name, ca_key, names=["host-a"])
    paths = {k: os.path.join(directory, v) for k, v in {
        "ca": "ca.pem", "server_cert": "server.pem", "server_key": "server.key",
        "client_cert": "client.pem", "client_key": "client.key",
        "host_a_cert": "host-a.pem", "host_a_key": "host-a.key"}.items()}
    _write(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))
    _write(paths["server_cert"], server.public_bytes(serialization.Encoding.PEM))
    _write(paths["server_key"], _pem_key(server_key))
    _write(paths["client_cert"], client.public_bytes(serialization.Encoding.PEM))
    _write(paths["client_key"], _pem_key(client_key))
    _write(paths["host_a_cert"], host_a.public_bytes(serialization.Encoding.PEM))
    _write(paths["host_a_key"], _pem_key(host_a_key))
    return paths


if __name__ == "__main__":
    import sys
    print(make(sys.argv[1]))
