"""The kernel side: the BPF program's loader, the decoding of what it sends, the header tree bcc compiles against."""
