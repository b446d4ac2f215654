"""
A server's TLS options from PEM files, for every listener of the project
(the passive-mode listener, the reference platform).

The certificate file may hold the chain after the server's certificate:
the intermediates are sent to clients with it.
"""

import re

_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class TLSFilesError(ValueError):
    """The PEM files cannot be used; the message names them and why."""


def server_options(cert_path, key_path):
    """
    @return: a L{twisted.internet.ssl.CertificateOptions} for a server.
    @raise TLSFilesError: if the files cannot be read, hold no certificate,
        or the key does not match.
    """
    from OpenSSL import SSL
    from twisted.internet import ssl

    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise TLSFilesError(f"cannot read {e.filename}: {e.strerror}") from None
    blocks = _CERTIFICATE.findall(cert_pem)
    if not blocks:
        raise TLSFilesError(f"{cert_path} holds no PEM certificate")
    try:
        private = ssl.PrivateCertificate.loadPEM(blocks[0] + b"\n" + key_pem)
        chain = [ssl.Certificate.loadPEM(b).original for b in blocks[1:]]
        return ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            extraCertChain=chain or None,
        )
    except (SSL.Error, ValueError) as e:
        raise TLSFilesError(f"cannot use {cert_path} and {key_path}: {e}") from None
