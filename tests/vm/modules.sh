# Sourced by build-initramfs and build-rootfs: the kernel modules a guest needs, taken from the
# tree tests/vm/fetch-kernel unpacked.
#
#   module_closure KERNEL_TREE MODULE...
# sets `module_root` (KERNEL_TREE/lib/modules/<version>), `kernel_version`, `module_files`
# (name -> file) and `ordered`: the closure of the MODULEs under `modinfo -F depends`,
# dependencies first, without those built into the kernel.
#
#   copy_module FILE TARGET
# writes FILE as a plain .ko to TARGET (busybox insmod does not decompress; Debian 12 ships them
# uncompressed, later releases may not).

module_closure() {
  local kernel_tree=$1
  shift
  local module_dirs=("$kernel_tree"/lib/modules/*)
  ((${#module_dirs[@]} == 1)) || die "expected one lib/modules/<version> in $kernel_tree"
  module_root=${module_dirs[0]}
  kernel_version=$(basename "$module_root")
  declare -gA module_files=()
  local file name
  while read -r file; do
    name=$(basename "$file")
    name=${name%%.ko*}
    module_files[${name//-/_}]=$file
  done < <(find "$module_root/kernel" -name '*.ko*')
  module_builtin=$(sed -e 's|.*/||' -e 's|\.ko.*||' -e 's|-|_|g' "$module_root/modules.builtin")
  declare -gA module_visited=()
  ordered=()
  local module
  for module in "$@"; do
    module_visit "$module"
  done
}

module_visit() {
  local key=${1//-/_}
  [[ -n ${module_visited[$key]:-} ]] && return
  module_visited[$key]=1
  if grep -qx "$key" <<<"$module_builtin"; then
    return
  fi
  local file=${module_files[$key]:-}
  [[ -n $file ]] || die "module $1 is in neither $module_root/kernel nor modules.builtin"
  local dependencies dependency
  dependencies=$(modinfo -F depends "$file")
  for dependency in ${dependencies//,/ }; do
    module_visit "$dependency"
  done
  ordered+=("$key")
}

copy_module() {
  case $1 in
    *.ko.xz) xz -dc "$1" >"$2" ;;
    *.ko.zst) zstd -qdc "$1" >"$2" ;;
    *.ko.gz) gzip -dc "$1" >"$2" ;;
    *.ko) cp "$1" "$2" ;;
    *) die "unknown module file type: $1" ;;
  esac
}
