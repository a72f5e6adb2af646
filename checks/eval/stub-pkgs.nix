# The packages the module refers to, as named store paths. Module evaluation only interpolates
# them into unit files and scripts; nothing is built. `writeText` is real: builtins.toFile; a
# `writeShellScript` keeps its `text`, as the real one's derivation does.
let
  package = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta.mainProgram = name;
  };
in
{
  plasmavmc = package "plasmavmc";
  qemu_kvm = package "qemu";
  iproute2 = package "iproute2";
  systemd = package "systemd";
  coreutils = package "coreutils";
  writeText = name: text: builtins.toFile name text;
  writeShellScript = name: text: package name // { inherit text; };
}
