"""
The one place that reaches under Twisted's public API, for speed.

Twisted reads a TCP connection 64 KiB at a time and sends at most 128 KiB
per turn of the reactor (C{SEND_LIMIT}, a guard meant for Windows).  For a
transfer of gigabytes that is a trip through the HTTP parser per 64 KiB,
and eight turns of the reactor per MiB sent.  The functions here change those two numbers on the connection of
one response or one request body; they need to find the TCP transport under
the objects treq and Twisted's HTTP client hand out, which they do through
attributes that are not Twisted's public API:

  - a response's C{original._transport._producer} (treq's wrapper, then
    Twisted's response, then the HTTP client protocol's transport proxy);
  - a request body consumer's C{_consumer} (Twisted's length-enforcing
    wrapper around the transport).

If Twisted renames any of these, nothing breaks but speed: the functions
find no transport and do nothing.  C{tests/test_transfer_fastpath.py}
checks, over a real connection, that they still find it, so such a change
fails a test instead of slowing transfers down unnoticed.
"""

from twisted.internet.abstract import FileDescriptor

#: Read size on a download's connection (Twisted's default is 64 KiB).
#: Each read allocates a new C{bytes} of this size.  At 1 MiB, glibc often
#: serves those from fresh C{mmap}s (its dynamic mmap threshold follows the
#: size of the last block freed, and reads return less than they ask for):
#: then every 4 KiB page of the download is a page fault, up to 280,000 per
#: GiB, and a verified download took 3.7-4.8 CPU-s per GiB instead of 2.4.
#: At 256 KiB the blocks come back from the heap (20,000-30,000 faults per
#: GiB, the same CPU in every run) and the HTTP parser still sees one read
#: per 256 KiB (measured with C{benchmarks/staging.py}; docs/benchmarks.rst).
RECV_SIZE = 256 << 10


def download_transport(response):
    """The TCP transport under a (treq-wrapped) response, or None."""
    inner = getattr(response, "original", response)
    proxy = getattr(inner, "_transport", None)
    transport = getattr(proxy, "_producer", None)
    return transport if isinstance(transport, FileDescriptor) else None


def upload_transport(consumer):
    """The TCP transport under a request body's consumer, or None."""
    transport = getattr(consumer, "_consumer", None)
    return transport if isinstance(transport, FileDescriptor) else None


def tune_download(response, size=RECV_SIZE):
    """
    Read this response's connection C{size} bytes at a time.  It stays so
    when the connection goes back to the pool; a later upload on it sets
    its own sizes.

    @return: whether the transport was found (and tuned).
    """
    transport = download_transport(response)
    if transport is None:
        return False
    transport.bufferSize = size
    return True


def tune_upload(consumer, block):
    """
    Make the TCP transport under C{consumer} send an upload's blocks of
    C{block} bytes the way they come, without copying or slicing them:

     - it pauses the producer as soon as it holds one block (its
       C{bufferSize} is just below one), and resumes it only once it has
       sent everything; so each block lands in an empty buffer and is sent
       from the very C{bytes} object that was read and hashed.  With room
       for two, Twisted joins the two into one new string before sending
       them: one more copy of both.  The socket's own buffer keeps the
       connection busy while the next block is handed over;
     - it hands a whole block to C{send()} at once instead of 128 KiB.

    Anything but a socket's own transport (TLS wraps it in a protocol that
    writes its records to it) is left alone.

    @return: whether the transport was found (and tuned).
    """
    transport = upload_transport(consumer)
    if transport is None:
        return False
    transport.bufferSize = block - 1
    transport.SEND_LIMIT = block
    return True
