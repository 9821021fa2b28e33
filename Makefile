# Convenience targets; ./gridctl does the work (and needs no make on a fresh machine).
.PHONY: run test check bench setup
run:
	./gridctl run
test:
	./gridctl test
check:
	./gridctl check
bench:
	./gridctl bench
setup:
	./gridctl setup
