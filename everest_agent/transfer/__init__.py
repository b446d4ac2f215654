"""
Moving a task's files: inputs in before it runs, outputs out after.

One module, one job:

  - L{urls}: the one URL scrubber (L{urls.public_url}) and where the
    platform's token may go (L{urls.same_origin});
  - L{errors}: how transfers fail, in the words of a task's reason;
  - L{exchange}: one GET or PUT attempt through treq, with watchdogs;
  - L{sink}: a response body streamed to a file, written and hashed in
    threads, with backpressure;
  - L{producer}: a file sent as a request body, read and hashed ahead;
  - L{fastpath}: the one place that tunes Twisted's TCP transport (and so
    the one place that uses names outside Twisted's public API);
  - L{retry}: the retry loop shared by downloads and uploads;
  - L{jobs}: the fair slot limiter, groups of transfers, shared jobs and
    the thread-pool seam;
  - L{space}: disk space claimed by downloads in flight;
  - L{cached}: the content cache glue;
  - L{stager}: L{stager.Stager}, which puts these together.

Paths inside a task directory (inputs' targets, outputs found and opened)
are walked by L{everest_agent.paths}, the one walker every caller shares.

Nothing is imported here, so C{everest_agent.transfer.urls} costs no
Twisted web import.
"""
