# Runs ./tests.nix: a list of { name; ok; detail; }, one per test, in name order. A test that
# fails to evaluate fails alone (tryEval), unless the error is one Nix cannot catch.
{
  lib ? import ./nixpkgs-lib.nix,
}:
let
  tests = import ./tests.nix { inherit lib; };
  attempt = value: builtins.tryEval (builtins.deepSeq value value);
  show = value: builtins.toJSON value;

  run =
    name: test:
    if test ? throws then
      {
        inherit name;
        ok = !(attempt test.throws).success;
        detail = "expected an evaluation error, got a value";
      }
    else
      let
        actual = attempt test.expr;
      in
      {
        inherit name;
        ok = actual.success && actual.value == test.expected;
        detail =
          if actual.success then
            "expected ${show test.expected}\n     got ${show actual.value}"
          else
            "evaluation failed (run it alone with --show-trace)";
      };
in
lib.mapAttrsToList run tests
