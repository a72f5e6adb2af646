# Assertions on disk creation and sizes, credentials and the cloud-init seed: the build refuses
# what the agent's validation would (agent/src/validate/provisioning.rs), naming the option.
{ config, lib, ... }:
let
  cfg = config.services.plasmavmc;
  store = builtins.storeDir;

  diskAssertions =
    p: id: d:
    let
      dp = "${p}.disks.${id}";
      from = if d.create == null then null else d.create.from;
      fromSizeMiB = if lib.isAttrs from then from.sizeMiB or null else null;
    in
    [
      {
        assertion = d.create == null || from != null || d.sizeMiB != null;
        message = "${dp}: a blank image (create without from) needs ${dp}.sizeMiB.";
      }
      {
        assertion = d.create == null || !d.create.backing || from != null;
        message = "${dp}.create.backing: an overlay needs the base image it sits on; set ${dp}.create.from.";
      }
      {
        assertion = d.create == null || !d.create.backing || d.format == "qcow2";
        message = "${dp}.create.backing: an overlay is a qcow2 image; set ${dp}.format = \"qcow2\".";
      }
      {
        # The base image's own size, when its derivation says it: a smaller sizeMiB would cut
        # it off (the agent refuses it too, at creation).
        assertion = fromSizeMiB == null || d.sizeMiB == null || d.sizeMiB >= fromSizeMiB;
        message = "${dp}.sizeMiB (${toString d.sizeMiB}) is below the ${toString fromSizeMiB} MiB of its base image ${dp}.create.from: shrinking destroys data.";
      }
      {
        assertion = !(d.sizeMiB != null && d.readOnly);
        message = "${dp}.sizeMiB: a read-only image may be shared by other disks; it is never resized.";
      }
      {
        assertion = !(d.deleteOnRemove && d.readOnly);
        message = "${dp}.deleteOnRemove: a read-only image may be shared by other disks; it is never deleted.";
      }
    ];

  contentAssertions = at: c: [
    {
      assertion = (c.text == null) != (c.file == null);
      message = "${at}: set exactly one of text (not secret: it lands in the Nix store) and file (read at VM start).";
    }
    {
      assertion = c.file == null || !lib.hasPrefix "${store}/" c.file;
      message = "${at}.file ${toString c.file} is in the Nix store, which every local user can read: give secrets as a path outside it (agenix, sops-nix), or use text for what is not secret.";
    }
  ];

  vmAssertions =
    name: vm:
    let
      p = "services.plasmavmc.vms.${name}";
    in
    lib.concatLists (lib.mapAttrsToList (diskAssertions p) vm.disks)
    ++ lib.concatLists (
      lib.mapAttrsToList (
        credential: c:
        [
          {
            assertion = builtins.match "[A-Za-z0-9_-][A-Za-z0-9_.-]{0,27}" credential != null;
            message = "${p}.credentials.\"${credential}\": credential names are 1 to 28 of A-Z a-z 0-9 _ . - (not starting with '.'): fw_cfg names are at most 55 bytes.";
          }
        ]
        ++ contentAssertions "${p}.credentials.\"${credential}\"" c
      ) vm.credentials
    )
    ++ lib.optionals (vm.cloudInit != null) (
      lib.concatLists (
        lib.mapAttrsToList (key: c: lib.optionals (c != null) (contentAssertions "${p}.cloudInit.${key}" c)) {
          inherit (vm.cloudInit) userData metaData networkConfig;
        }
      )
    );
in
{
  config = lib.mkIf cfg.enable {
    assertions = lib.concatLists (lib.mapAttrsToList vmAssertions cfg.vms);
  };
}
