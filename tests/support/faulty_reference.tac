"""`twistd -n -y tests/support/faulty_reference.tac`: the reference backend plus failure injection, for tests only.

Failure injection does not belong in the reference backend that ships (a production twistd plugin);
it lives here. The reference backend's own options come from the environment variable
TFTPO_BACKEND_ARGS (e.g. "--socket /tmp/x.sock --root /srv/tftp"). On top of what the reference
backend serves:

    errors/crash    an unexpected exception (the client sees error 0 "Internal server error", the
                    backend's log a traceback)
"""

import os
import shlex

from twisted.application.service import Application

from tftp_offload import reference


class FaultyReferenceBackend(reference.ReferenceBackend):
    def get_reader(self, file_name):
        if file_name.replace(b"\\", b"/").lstrip(b"/") == b"errors/crash":
            self.lookups += 1
            raise RuntimeError("the reference backend crashed on purpose")
        return super().get_reader(file_name)


options = reference.Options()
options.parseOptions(shlex.split(os.environ["TFTPO_BACKEND_ARGS"]))
application = Application("tftp-offload-faulty-backend")
reference.makeService(options, FaultyReferenceBackend).setServiceParent(application)
