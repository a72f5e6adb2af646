# The nixpkgs lib the evaluation tests use: $PLASMAVMC_NIXPKGS_LIB (an absolute path to a
# nixpkgs `lib` directory) or the copy in `shared/` beside the repository.
let
  fromEnv = builtins.getEnv "PLASMAVMC_NIXPKGS_LIB";
in
import (if fromEnv != "" then /. + fromEnv else ../../../shared/nixpkgs-lib/lib)
