from twisted.application.service import ServiceMaker

tftpOffload = ServiceMaker(
    "tftp-offload", "tftp_offload.tap", "TFTP server for network boot with offloaded backends", "tftp-offload"
)
