"""Recording flows: the child process that writes mitmproxy flow files off the proxy's thread."""
