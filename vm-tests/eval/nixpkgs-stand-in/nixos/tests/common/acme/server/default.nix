# Stand-in for nixpkgs' ACME test server module (imported by vm-tests/acme.nix): the
# values other nodes read (test-support.acme.*) are declared with their defaults in
# vm-tests/eval/stub.nix.
_: { }
