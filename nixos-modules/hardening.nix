# systemd sandboxing for the agent. QEMU is started by the agent through `systemd-run --scope`,
# which moves it to another cgroup but keeps this unit's namespaces and capability bounding set,
# so everything here also confines QEMU. Left out on purpose (see docs/operator-guide.md):
#   MemoryDenyWriteExecute  TCG translates guest code into freshly written executable memory.
#   PrivateDevices          QEMU needs /dev/kvm, /dev/net/tun, /dev/vhost-net and block devices.
#   PrivateNetwork          taps live on the host's bridges.
#   PrivateTmp              its directory is removed when the agent stops, under running VMs.
#   ProtectSystem=strict, ProtectHome
#                           disk images may live anywhere, and widening ReadWritePaths for a new
#                           disk would need a new namespace, i.e. an agent restart.
#   DeviceAllow / ProtectClock
#                           a device allow-list on the agent's cgroup; QEMU's scope escapes it
#                           anyway, and /dev/net/tun is opened by the agent itself.
{
  CapabilityBoundingSet = [
    "CAP_NET_ADMIN" # create taps, attach them to bridges
    "CAP_DAC_OVERRIDE" # open disk images owned by other users
    "CAP_CHOWN" # give disk images, block devices and VM directories to qemuUser
    "CAP_FOWNER"
    "CAP_KILL"
    "CAP_SETUID" # systemd-run --uid drops QEMU to qemuUser (HA VMs: the fence guard does)
    "CAP_SETGID"
    "CAP_SYS_RESOURCE" # raise RLIMIT_MEMLOCK / RLIMIT_NOFILE for guests with many devices
    "CAP_IPC_LOCK" # locked guest memory (mem-lock=on)
  ];
  NoNewPrivileges = true;
  ProtectSystem = "full";
  ProtectKernelTunables = true;
  ProtectKernelModules = true;
  ProtectKernelLogs = true;
  ProtectControlGroups = true;
  ProtectHostname = true;
  RestrictNamespaces = true;
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  LockPersonality = true;
  SystemCallArchitectures = "native";
  RestrictAddressFamilies = [
    "AF_UNIX" # QMP, control socket, D-Bus to systemd
    "AF_NETLINK" # ip link
    "AF_INET" # ChainFire, migration
    "AF_INET6"
  ];
  UMask = "0077";
}
