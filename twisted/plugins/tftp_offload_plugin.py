from twisted.application.service import ServiceMaker

tftpOffload = ServiceMaker(
    "tftp-offload", "tftp_offload.tap", "TFTP server for network boot with offloaded backends", "tftp-offload"
)

tftpOffloadBackend = ServiceMaker(
    "tftp-offload-backend",
    "tftp_offload.reference",
    "The reference backend for tftp-offload: a directory plus generated files, on a UNIX socket",
    "tftp-offload-backend",
)
