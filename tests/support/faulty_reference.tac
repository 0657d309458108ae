"""`twistd -n -y tests/support/faulty_reference.tac`: the reference backend plus failure injection, for tests only.

Failure injection does not belong in the reference backend that ships (a production twistd plugin);
it lives here. The reference backend's own options come from the environment variable
TFTPO_BACKEND_ARGS (e.g. "--socket /tmp/x.sock --root /srv/tftp"). On top of what the reference
backend serves:

    errors/not-found, errors/access-violation, errors/illegal-operation, errors/backend-error
                    the matching typed error, with a text of the backend's own
    errors/crash    an unexpected exception (the client sees error 0 "Internal server error", the
                    backend's log a traceback)
"""

import os
import shlex

from twisted.application.service import Application

from tftp_offload import reference
from tftp_offload.errors import AccessViolation, BackendError, FileNotFound, Unsupported

FAULTS = {
    b"errors/not-found": FileNotFound("No such file on the reference backend"),
    b"errors/access-violation": AccessViolation("The reference backend says no"),
    b"errors/illegal-operation": Unsupported("The reference backend cannot do that"),
    b"errors/backend-error": BackendError("Reference backend: something went wrong"),
    b"errors/crash": RuntimeError("the reference backend crashed on purpose"),
}


class FaultyReferenceBackend(reference.ReferenceBackend):
    def get_reader(self, file_name):
        fault = FAULTS.get(file_name.replace(b"\\", b"/").lstrip(b"/"))
        if fault is not None:
            self.lookups += 1
            raise fault
        return super().get_reader(file_name)


options = reference.Options()
options.parseOptions(shlex.split(os.environ["TFTPO_BACKEND_ARGS"]))
application = Application("tftp-offload-faulty-backend")
reference.makeService(options, FaultyReferenceBackend).setServiceParent(application)
