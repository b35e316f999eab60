"""What the tests run the mirror against: a fake PyPI speaking the real
protocol, wheels built in code, Debian's nginx and rsync daemons, and the
end-to-end helpers that drive ``mirror`` and check its tree."""
