# The VM tests' guest checks (busybox sh), sourced by /init. Each check runs in its own subshell
# and ends it with `fail REASON` on the first thing that is wrong; /init turns that into an
# IMGCRYPT-RESULT line. The host wrote /mnt/payload/manifest.sh: the key, the sources and what
# they must decrypt to (digests computed on the host from `qemu-img convert -O raw`).
#
# No sleeping as synchronisation: every wait polls a condition against a deadline.

# The real util-linux tools by path: busybox sh runs its own applets of the same name first.
SETPRIV=/usr/local/bin/setpriv
LOSETUP=/usr/local/bin/losetup

SOCKET=/run/imgcrypt-vm/io.imgcrypt
PIDS=/run/imgcrypt-vm.pids
# Cheap keyslots: the checks are about data and devices, not about PBKDF cost.
CHEAP_PBKDF="--pbkdf pbkdf2 --pbkdf-iterations 1000"
# Bounds for things that finish in seconds under TCG; a hang still ends the check.
JOB_TIMEOUT=600

fail() {
    echo "FAIL-REASON: $*"
    exit 1
}

# --- time -------------------------------------------------------------------------------------

# Hundredths of a second since boot (/proc/uptime always has two decimals).
uptime_centis() {
    read -r up _ </proc/uptime
    echo $((${up%.*} * 100 + 1${up#*.} - 100))
}

centis_to_seconds() {
    printf '%d.%02d\n' $(($1 / 100)) $(($1 % 100))
}

uptime_seconds() {
    centis_to_seconds "$(uptime_centis)"
}

# wait_until SECONDS COMMAND...: polls COMMAND every 50 ms until it succeeds (status 0) or the
# deadline passes (status 1).
wait_until() {
    deadline=$(($(uptime_centis) + $1 * 100))
    shift
    until "$@"; do
        [ "$(uptime_centis)" -lt "$deadline" ] || return 1
        sleep 0.05
    done
}

# --- processes --------------------------------------------------------------------------------

# Running (not gone, not a zombie waiting to be reaped).
proc_alive() {
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed 's/^.*) \(.\).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

proc_gone() {
    ! proc_alive "$1"
}

# is_mounted DIR (busybox has no mountpoint).
is_mounted() {
    awk -v dir="$1" '$2 == dir { found = 1 } END { exit !found }' /proc/mounts
}

remember_pid() {
    echo "$1" >>"$PIDS"
}

# --- disks and devices ------------------------------------------------------------------------

disk_with_serial() {
    for dir in /sys/block/vd*; do
        [ -f "$dir/serial" ] || continue
        if [ "$(cat "$dir/serial")" = "$1" ] && [ -b "/dev/${dir##*/}" ]; then
            echo "/dev/${dir##*/}"
            return 0
        fi
    done
    return 1
}

# wait_for_disk SERIAL SECONDS: prints the virtio disk's device path.
wait_for_disk() {
    wait_until "$2" disk_with_serial "$1" >/dev/null && disk_with_serial "$1"
}

# Mapper names the daemon owns: its name prefix or its DM UUID prefix.
imgcrypt_mappers() {
    dmsetup info -c --noheadings --separator ' ' -o name,uuid 2>/dev/null |
        awk '$1 ~ /^imgcrypt-/ || $2 ~ /^IMGCRYPT-/ { print $1 }'
}

# Loop devices whose backing file's path contains $1 (util-linux losetup; a deleted file shows
# as "PATH (deleted)", so the partial file still matches).
loops_on() {
    "$LOSETUP" -a 2>/dev/null | grep -F "$1"
}

no_leftovers_for() {
    [ -z "$(imgcrypt_mappers)" ] && [ -z "$(loops_on "$1")" ]
}

# assert_no_leftovers OUTPUT: no daemon mapper and no loop device on OUTPUT (or OUTPUT.partial),
# allowing the kernel up to 10 s to finish an asynchronous loop detach.
assert_no_leftovers() {
    if ! wait_until 10 no_leftovers_for "$1"; then
        echo "dmsetup ls:"
        dmsetup ls
        echo "losetup -a:"
        "$LOSETUP" -a
        fail "left behind: mappers [$(imgcrypt_mappers | tr '\n' ' ')] loops [$(loops_on "$1" | tr '\n' ' ')]"
    fi
}

assert_no_output() {
    [ ! -e "$1" ] || fail "$1 exists after a failed job"
    [ ! -e "$1.partial" ] || fail "$1.partial exists after a failed job"
}

# /sys/block/dm-N of mapper $1.
dm_sysfs() {
    for dir in /sys/block/dm-*; do
        [ "$(cat "$dir/dm/name" 2>/dev/null)" = "$1" ] && echo "$dir" && return 0
    done
    return 1
}

# The daemon is mid-copy: its mapper exists and has had sectors written, but not all of them.
# Shell built-ins only: this runs every 50 ms, and each fork costs milliseconds under TCG.
mid_copy() {
    for dir in /sys/block/dm-*; do
        read -r name <"$dir/dm/name" 2>/dev/null || continue
        case $name in
        imgcrypt-*) ;;
        *) continue ;;
        esac
        read -r _ _ _ _ _ _ written _ <"$dir/stat" || continue
        read -r total <"$dir/size" || continue
        [ "$written" -gt 0 ] && [ "$written" -lt "$total" ] && return 0
    done
    return 1
}

# The slow disk: the host's ext4 image behind dm-delay, so every read of the source takes
# SLOW_DELAY_MS and a copy lasts seconds whatever the emulation speed. Mounted read-only.
mount_slow_source() {
    is_mounted /mnt/slow && return 0
    disk=$(wait_for_disk slow 10) || fail "no virtio disk with serial 'slow'"
    if ! dmsetup info vmtest-slow >/dev/null 2>&1; then
        sectors=$(blockdev --getsz "$disk")
        dmsetup create vmtest-slow --table "0 $sectors delay $disk 0 $SLOW_DELAY_MS" ||
            fail "cannot create the dm-delay device over $disk"
    fi
    # Without udev, libdevmapper leaves the /dev/mapper node to us.
    dmsetup mknodes vmtest-slow
    mkdir -p /mnt/slow
    mount -t ext4 -o ro,noload /dev/mapper/vmtest-slow /mnt/slow ||
        fail "cannot mount the slow disk"
}

# Nothing of the slow source in the page cache: the next job must read it through dm-delay.
drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# --- the daemon and the client ----------------------------------------------------------------

DAEMON_STARTS=0

daemon_ready() {
    proc_alive "$DAEMON_PID" ||
        fail "imgcryptd exited at start-up: $(tail -n 3 "$DAEMON_LOG" | tr '\n' ' ')"
    [ -S "$SOCKET" ] && grep -q listening "$DAEMON_LOG"
}

# daemon_start: a root imgcryptd with the kernel engine on $SOCKET, world-connectable.
daemon_start() {
    DAEMON_STARTS=$((DAEMON_STARTS + 1))
    DAEMON_LOG=/tmp/imgcryptd.$DAEMON_STARTS.log
    # No start-up PBKDF benchmark: seconds of argon2 in a TCG guest, racing the first check.
    # Resume checkpoints in the guest's tmpfs: they outlive a daemon restart within the boot.
    IMGCRYPTD_LOG=debug imgcryptd --socket "$SOCKET" --engine kernel --socket-mode 0666 \
        --no-startup-benchmark --state-dir /tmp/imgcrypt-state >"$DAEMON_LOG" 2>&1 &
    DAEMON_PID=$!
    remember_pid "$DAEMON_PID"
    wait_until 60 daemon_ready || fail "imgcryptd did not listen within 60 s"
    echo "imgcryptd $DAEMON_PID listening (log $DAEMON_LOG)"
}

show_daemon_log() {
    echo "--- imgcryptd log $DAEMON_LOG:"
    cat "$DAEMON_LOG"
    echo "---"
}

# daemon_stop: SIGTERM and wait for it to exit.
daemon_stop() {
    kill -TERM "$DAEMON_PID" 2>/dev/null
    wait_until 60 proc_gone "$DAEMON_PID" || fail "imgcryptd did not exit within 60 s of SIGTERM"
    wait "$DAEMON_PID" 2>/dev/null
    show_daemon_log
}

# encrypt SOURCE OUTPUT RESULT_PREFIX [ARGS...]: imgctl through the daemon, kernel engine, JSON
# lines to RESULT_PREFIX.json, stderr to RESULT_PREFIX.err; returns imgctl's status.
encrypt() {
    source=$1 output=$2 result=$3
    shift 3
    # shellcheck disable=SC2086 # CHEAP_PBKDF is several words
    timeout -s KILL "$JOB_TIMEOUT" imgctl --socket "$SOCKET" encrypt "$source" -o "$output" \
        --key-file "$KEY" $CHEAP_PBKDF --engine kernel --json "$@" \
        >"$result.json" 2>"$result.err"
}

show_result() {
    echo "imgctl stdout:"
    cat "$1.json"
    echo "imgctl stderr:"
    cat "$1.err"
}

# verify_luks IMAGE NAME VSIZE SHA256 [PAYLOAD_SIZE [SECTOR_SIZE]]: opens IMAGE with real
# cryptsetup (dm-crypt) read-only; the decrypted device's first VSIZE bytes must hash to SHA256
# and every byte after them must be zero. With PAYLOAD_SIZE the device must be that large, with
# SECTOR_SIZE the crypt table must use it.
verify_luks() {
    image=$1 name=$2 vsize=$3 want=$4 payload_size=${5:-} sector_size=${6:-}
    cryptsetup open --readonly --key-file "$KEY" "$image" "$name" ||
        fail "cryptsetup open --key-file $KEY $image failed"
    device=/dev/mapper/$name
    table=$(dmsetup table "$name")
    echo "dm table: $(echo "$table" | sed 's/ [0-9a-f:]\{20,\}/ <key>/')"
    size=$(blockdev --getsize64 "$device")
    problem=
    case $table in
    *" crypt aes-xts-plain64 "*) ;;
    *) problem="not a crypt aes-xts-plain64 table" ;;
    esac
    if [ -n "$sector_size" ] && [ "$sector_size" != 512 ]; then
        case $table in
        *"sector_size:$sector_size"*) ;;
        *) problem="dm-crypt table lacks sector_size:$sector_size" ;;
        esac
    fi
    if [ -n "$payload_size" ] && [ "$size" != "$payload_size" ]; then
        problem="decrypted device holds $size bytes, expected $payload_size"
    fi
    [ $((vsize % 512)) -eq 0 ] || problem="virtual size $vsize is not whole sectors"
    [ "$size" -ge "$vsize" ] || problem="decrypted device ($size bytes) smaller than the source ($vsize)"
    if [ -z "$problem" ]; then
        got=$(head -c "$vsize" "$device" | sha256sum | cut -d' ' -f1)
        rest=$((size - vsize))
        tail_sum=$(dd if="$device" bs=512 skip=$((vsize / 512)) 2>/dev/null | sha256sum | cut -d' ' -f1)
        zero_sum=$(head -c "$rest" /dev/zero | sha256sum | cut -d' ' -f1)
        if [ "$got" != "$want" ]; then
            problem="first $vsize decrypted bytes have sha256 $got, the source $want"
        elif [ "$tail_sum" != "$zero_sum" ]; then
            problem="the $rest bytes after the source are not all zero"
        fi
    fi
    cryptsetup close "$name" || fail "cryptsetup close $name failed"
    [ -z "$problem" ] || fail "$image: $problem"
    echo "$image: $vsize bytes equal the source (sha256 $got), $rest zero bytes after"
}

# --- b: the userspace engine's outputs, made on the host, opened by dm-crypt -------------------

check_userspace_output() {
    variant=$(echo "$1" | tr '-' '_')
    eval "serial=\$b_${variant}_serial vsize=\$b_${variant}_vsize sha=\$b_${variant}_sha256"
    eval "payload_size=\$b_${variant}_payload_size sector_size=\$b_${variant}_sector_size"
    if [ -z "$serial" ] || [ -z "$vsize" ] || [ -z "$sha" ]; then
        fail "manifest has no entry for $1"
    fi
    disk=$(wait_for_disk "$serial" 10) || fail "no virtio disk with serial '$serial'"
    verify_luks "$disk" "vmcheck-$1" "$vsize" "$sha" "$payload_size" "$sector_size"
}

# --- a: the kernel engine encrypts a dynamic VHD in the guest -----------------------------------

check_kernel_encrypt() {
    out=/mnt/payload/a.luks
    daemon_start
    if ! encrypt "$SOURCE_A" "$out" /tmp/a; then
        show_result /tmp/a
        show_daemon_log
        fail "imgctl failed: $(tail -n 1 /tmp/a.err)"
    fi
    show_result /tmp/a
    grep '"event":"summary"' /tmp/a.json | grep -q '"engine":"kernel"' ||
        fail "the summary does not name engine kernel"
    [ ! -e "$out.partial" ] || fail "$out.partial left after success"
    assert_no_leftovers "$out"
    daemon_stop
    verify_luks "$out" vmcheck-a "$A_VSIZE" "$A_SHA256"
}

# --- e: the kernel engine's copy against dd onto the same dm-crypt stack (a measurement) -------

# Not a timed assertion: under TCG absolute speeds mean nothing, but the ratio of the engine's
# copy (imgctl's copy_ms: reading the source through the daemon's read side, writing onto
# dm-crypt over a loop device on the output, fsync) to `dd if=/dev/zero bs=4M oflag=direct
# conv=fsync` of the same number of bytes onto the same stack (cryptsetup open of the finished
# image: dm-crypt over a loop device on the same file) shows whether the pipeline or dm-crypt
# is the bottleneck. Prints `IMGCRYPT-MEASURE kernel-copy-vs-dd ...`; fails only if a step fails.
check_kernel_ratio() {
    out=/mnt/payload/e.luks
    daemon_start
    drop_caches
    if ! encrypt "$SOURCE_E" "$out" /tmp/e; then
        show_result /tmp/e
        show_daemon_log
        fail "imgctl failed: $(tail -n 1 /tmp/e.err)"
    fi
    summary=$(grep '"event":"summary"' /tmp/e.json)
    copy_ms=$(echo "$summary" | sed -n 's/.*"copy_ms":\([0-9]*\).*/\1/p')
    payload=$(echo "$summary" | sed -n 's/.*"payload_size":\([0-9]*\).*/\1/p')
    [ -n "$copy_ms" ] && [ -n "$payload" ] || fail "no copy_ms or payload_size in: $summary"
    grep -q "source data reads: O_DIRECT" "$DAEMON_LOG" ||
        echo "note: the daemon did not read the source with O_DIRECT"
    daemon_stop
    verify_luks "$out" vmcheck-e "$E_VSIZE" "$E_SHA256"
    cryptsetup open --key-file "$KEY" "$out" vmcheck-e || fail "cryptsetup open $out failed"
    drop_caches
    start=$(uptime_centis)
    dd if=/dev/zero of=/dev/mapper/vmcheck-e bs=4M count=$((payload / 4194304)) oflag=direct \
        conv=fsync 2>/tmp/e.dd || {
        cat /tmp/e.dd
        cryptsetup close vmcheck-e
        fail "dd onto the dm-crypt device failed"
    }
    dd_ms=$((($(uptime_centis) - start) * 10))
    cryptsetup close vmcheck-e || fail "cryptsetup close vmcheck-e failed"
    [ "$dd_ms" -gt 0 ] || dd_ms=10
    dd_bytes=$((payload / 4194304 * 4194304))
    rm -f "$out"
    # Per byte: dd writes whole 4 MiB blocks, a little less than the payload.
    ratio=$(awk -v c="$copy_ms" -v p="$payload" -v d="$dd_ms" -v b="$dd_bytes" \
        'BEGIN { printf "%.2f", (c / p) / (d / b) }')
    echo "IMGCRYPT-MEASURE kernel-copy-vs-dd payload=$payload copy_ms=$copy_ms dd_bytes=$dd_bytes dd_ms=$dd_ms ratio=$ratio"
}

# Encrypts the slow (dm-delay) source into $1 in the background, its output going to $2; sets
# $client to that imgctl's pid and returns once the kernel engine's mapper is mid-copy.
start_slow_encrypt() {
    mount_slow_source
    drop_caches
    daemon_start
    encrypt "/mnt/slow/$SLOW_SOURCE" "$1" "$2" &
    client=$!
    remember_pid "$client"
    if ! wait_until 120 mid_copy; then
        show_result "$2"
        show_daemon_log
        fail "never saw the kernel engine's mapper mid-copy within 120 s"
    fi
}

# The running job has saved a resume checkpoint (a whole checkpoint range is durable).
checkpoint_saved() {
    grep -q "checkpoint saved" "$DAEMON_LOG"
}

# start_checkpointed_encrypt OUTPUT RESULT_PREFIX: start_slow_encrypt, then returns once a
# checkpoint is saved and the copy of the next range is under way (its mapper mid-copy).
start_checkpointed_encrypt() {
    start_slow_encrypt "$1" "$2"
    if ! wait_until 120 checkpoint_saved || ! wait_until 120 mid_copy; then
        show_result "$2"
        show_daemon_log
        fail "never saw a checkpoint and the next range mid-copy within 120 s"
    fi
}

# resume_slow_encrypt OUTPUT RESULT_PREFIX: re-runs the interrupted job of start_slow_encrypt on
# the running daemon; it must resume past 0, leave no device, and decrypt to the source.
resume_slow_encrypt() {
    [ -e "$1.partial" ] || fail "imgctl did not keep $1.partial for the re-run"
    [ ! -e "$1" ] || fail "$1 exists after the interrupted job"
    if ! encrypt "/mnt/slow/$SLOW_SOURCE" "$1" "$2"; then
        show_result "$2"
        show_daemon_log
        fail "the re-run failed: $(tail -n 1 "$2.err")"
    fi
    show_result "$2"
    from=$(sed -n 's/.*"resumed_from":\([0-9]*\).*/\1/p' "$2.json")
    [ -n "$from" ] && [ "$from" -gt 0 ] || fail "the re-run did not resume past 0 (resumed_from '$from')"
    grep '"event":"summary"' "$2.json" | grep -q '"engine":"kernel"' ||
        fail "the re-run's summary does not name engine kernel"
    assert_no_leftovers "$1"
    daemon_stop
    verify_luks "$1" "vmcheck-$(basename "$1" .luks)" "$SLOW_VSIZE" "$SLOW_SHA256"
}

# --- c: kill -9 mid-copy, restart: the crash's mapper and loop are cleaned up -----------------

check_kill9_restart() {
    out=/mnt/payload/c.luks
    start_checkpointed_encrypt "$out" /tmp/c
    # Each checkpoint range has a mapping of its own, so between two ranges there is none: freeze
    # the daemon (SIGSTOP stops every thread at once) and kill it only while one exists.
    mapper=
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        kill -STOP "$DAEMON_PID"
        mapper=$(imgcrypt_mappers | head -n 1)
        [ -n "$mapper" ] && break
        kill -CONT "$DAEMON_PID"
        wait_until 30 mid_copy
    done
    [ -n "$mapper" ] || fail "precondition: never froze the daemon while a range's mapper existed"
    echo "mid-copy: $mapper, $(awk '{ print $7 }' "$(dm_sysfs "$mapper")/stat") sectors written"
    kill -9 "$DAEMON_PID"
    wait_until 30 proc_gone "$DAEMON_PID" || fail "imgcryptd survived kill -9"
    wait "$DAEMON_PID" 2>/dev/null
    show_daemon_log
    wait_until 60 proc_gone "$client" || fail "imgctl did not exit within 60 s of the daemon's death"
    wait "$client" && fail "imgctl succeeded although its daemon was killed"
    show_result /tmp/c

    # The crash must really have left something, or the restart proves nothing.
    imgcrypt_mappers | grep -qx "$mapper" ||
        fail "precondition: $mapper was already gone after kill -9 (the copy ended first?)"
    loop=$(dmsetup deps -o devname "$mapper" | sed -n 's/.*(\(loop[0-9]*\)).*/\1/p')
    [ -n "$loop" ] || fail "precondition: no loop device under $mapper after kill -9"
    echo "after kill -9: $mapper on $("$LOSETUP" "/dev/$loop")"
    [ -n "$(loops_on "$out")" ] || fail "precondition: /dev/$loop is not attached to $out"

    daemon_start
    assert_no_leftovers "$out"
    "$LOSETUP" "/dev/$loop" >/dev/null 2>&1 && fail "/dev/$loop is still attached after the restart"
    [ ! -e "$out" ] || fail "$out exists after the killed job"
    grep -q "$mapper" "$DAEMON_LOG" || fail "the restarted daemon did not log removing $mapper"
    # imgctl keeps a raw LUKS partial file when the daemon dies, and the re-run resumes it
    # (docs/user-guide.md, "Resuming").
    resume_slow_encrypt "$out" /tmp/c2
}

# --- d: an unprivileged user through the root daemon --------------------------------------------

check_unprivileged() {
    dir=/mnt/payload/d-out
    mkdir -p "$dir"
    chown 1000:1000 "$dir"
    cp "$KEY" "$dir/key"
    chown 1000:1000 "$dir/key"
    chmod 0600 "$dir/key"
    out=$dir/d.luks
    daemon_start
    # shellcheck disable=SC2086
    if ! timeout -s KILL "$JOB_TIMEOUT" "$SETPRIV" --reuid=1000 --regid=1000 --clear-groups \
        imgctl --socket "$SOCKET" encrypt "$SOURCE_D" -o "$out" --key-file "$dir/key" \
        $CHEAP_PBKDF --engine kernel --json >/tmp/d.json 2>/tmp/d.err; then
        show_result /tmp/d
        show_daemon_log
        fail "imgctl as uid 1000 failed: $(tail -n 1 /tmp/d.err)"
    fi
    show_result /tmp/d
    grep '"event":"summary"' /tmp/d.json | grep -q '"engine":"kernel"' ||
        fail "the summary does not name engine kernel"
    owner=$(stat -c %u:%g "$out")
    [ "$owner" = 1000:1000 ] || fail "$out is owned by $owner, not by the user who ran imgctl"
    assert_no_leftovers "$out"
    daemon_stop
    verify_luks "$out" vmcheck-d "$D_VSIZE" "$D_SHA256"
}

# --- teardown on failure ------------------------------------------------------------------------

# expect_failure STATUS RESULT_PREFIX OUTPUT: the job just run failed and left no mapper, loop
# device or file.
expect_failure() {
    status=$1 result=$2 out=$3
    show_result "$result"
    [ "$status" -ne 0 ] || fail "imgctl succeeded where it must fail"
    assert_no_leftovers "$out"
    assert_no_output "$out"
}

# Output on a tmpfs too small for it: fails when the space is reserved (tmpfs has fallocate).
check_teardown_enospc() {
    mkdir -p /mnt/small
    mount -t tmpfs -o size=8m tmpfs /mnt/small || fail "cannot mount a tmpfs"
    out=/mnt/small/e.luks
    daemon_start
    encrypt "$SOURCE_A" "$out" /tmp/e
    status=$?
    # Checked while the daemon still runs: its shutdown must not be what cleans up.
    expect_failure "$status" /tmp/e "$out"
    daemon_stop
    grep -qi 'space' /tmp/e.err || fail "the error does not say the output is out of space"
    umount /mnt/small
}

# Output on a small ext2: no fallocate there, so ENOSPC arrives in the middle of the copy,
# through the loop device and dm-crypt.
check_teardown_enospc_write() {
    disk=$(wait_for_disk small-ext2 10) || fail "no virtio disk with serial 'small-ext2'"
    mkdir -p /mnt/ext2
    mount -t ext2 "$disk" /mnt/ext2 || fail "cannot mount the ext2 disk"
    out=/mnt/ext2/w.luks
    daemon_start
    encrypt "$SOURCE_A" "$out" /tmp/w
    status=$?
    # Checked while the daemon still runs: its shutdown must not be what cleans up.
    expect_failure "$status" /tmp/w "$out"
    daemon_stop
    umount /mnt/ext2
}

# SIGTERM to the daemon mid-copy cancels the job and tears down before the daemon exits.
# SIGTERM mid-copy: the job saves a final checkpoint, its devices are torn down, the daemon
# exits, imgctl fails saying how to resume and keeps OUT.partial; after a restart the re-run
# resumes and the image decrypts to the source.
check_teardown_sigterm() {
    out=/mnt/payload/t.luks
    start_checkpointed_encrypt "$out" /tmp/t
    echo "mid-copy: $(imgcrypt_mappers | head -n 1); sending SIGTERM"
    kill -TERM "$DAEMON_PID"
    wait_until 120 proc_gone "$DAEMON_PID" || fail "imgcryptd did not exit within 120 s of SIGTERM"
    wait "$DAEMON_PID" 2>/dev/null
    show_daemon_log
    wait_until 60 proc_gone "$client" || fail "imgctl did not exit within 60 s"
    wait "$client"
    status=$?
    show_result /tmp/t
    [ "$status" -ne 0 ] || fail "imgctl succeeded although the daemon stopped"
    assert_no_leftovers "$out"
    grep -q "progress checkpointed" "$DAEMON_LOG" || fail "the daemon did not checkpoint the job"
    grep -q "again to resume" /tmp/t.err || fail "imgctl's error does not say how to resume"
    daemon_start
    resume_slow_encrypt "$out" /tmp/t2
}

# --- teardown on I/O errors and when the client goes away ---------------------------------------

# job_devices LOG: "MAPPER LOOP" of the last copy the kernel engine started ("kernel engine copy
# starting ... mapper=imgcrypt-N ... loop_device=loopM"), or nothing if none started.
job_devices() {
    sed -n 's/.*kernel engine copy starting.* mapper=\([^ ]*\) .*loop_device=\(loop[0-9]*\).*/\1 \2/p' \
        "$1" | tail -n 1
}

# The devices a job used: the mapper is gone and the loop device is detached.
job_devices_gone() {
    ! dmsetup info "$1" >/dev/null 2>&1 && ! "$LOSETUP" "/dev/$2" >/dev/null 2>&1
}

# assert_job_devices_gone LOG: the devices the last copy in LOG started with existed (else the
# check proves nothing) and are gone now, allowing 10 s for an asynchronous loop detach.
assert_job_devices_gone() {
    devices=$(job_devices "$1")
    [ -n "$devices" ] ||
        fail "precondition: the kernel engine never started a copy, so there was nothing to tear down"
    mapper=${devices% *} loop=${devices#* }
    echo "the job ran on mapper $mapper over /dev/$loop"
    if ! wait_until 10 job_devices_gone "$mapper" "$loop"; then
        dmsetup ls
        "$LOSETUP" -a
        fail "the job's devices remain: mapper $mapper or /dev/$loop ($("$LOSETUP" "/dev/$loop" 2>&1))"
    fi
}

# scratch_device NAME TABLE: device-mapper device /dev/mapper/NAME over the scratch disk; TABLE
# says @DISK@ for the disk's path.
scratch_device() {
    disk=$(wait_for_disk scratch 10) || fail "no virtio disk with serial 'scratch'"
    printf '%s\n' "$2" | sed "s|@DISK@|$disk|g" | dmsetup create "$1" ||
        fail "cannot create $1 over $disk"
    dmsetup mknodes "$1"
    echo "$1: $(dmsetup table "$1" | tr '\n' ';')"
}

# Nobody holds device-mapper device $1 open: no loop device, no process.
not_open() {
    [ "$(dmsetup info -c --noheadings -o open "$1" 2>/dev/null | tr -d ' ')" = 0 ]
}

# remove_scratch_device NAME: it must be free (not_open, within 10 s) and removable.
remove_scratch_device() {
    if ! wait_until 10 not_open "$1"; then
        "$LOSETUP" -a
        fail "$1 is still open: $(dmsetup info -c -o name,open "$1" | tail -n 1)"
    fi
    dmsetup remove "$1" || fail "cannot remove $1"
}

# The OUTPUT is a block device whose tail fails with EIO: 32 MiB of the scratch disk, then 32 MiB
# of dm `error`. Source a needs 49 MiB (a 16 MiB LUKS2 header, 33 MiB of payload), so the header
# and the first 16 MiB of payload land, and the copy then meets EIO through dm-crypt and the loop
# device the engine attaches to the output device.
check_teardown_eio() {
    scratch_device vmtest-eio "0 65536 linear @DISK@ 0
65536 65536 error"
    out=/dev/mapper/vmtest-eio
    daemon_start
    encrypt "$SOURCE_A" "$out" /tmp/i --force
    status=$?
    show_result /tmp/i
    [ "$status" -ne 0 ] || fail "imgctl succeeded writing to a device that fails with EIO"
    # Checked while the daemon still runs: its shutdown must not be what cleans up.
    assert_job_devices_gone "$DAEMON_LOG"
    assert_no_leftovers "$out"
    proc_alive "$DAEMON_PID" || fail "imgcryptd died after the I/O error"
    daemon_stop
    grep -q '"error":"io.imgcrypt.IoError"' /tmp/i.json || fail "the job did not fail with IoError"
    grep -qi 'input/output error' /tmp/i.err || fail "the error does not say it is an I/O error"
    # The message counts payload offsets (it says so); the first failing one is at 16 MiB (the
    # output's 32 MiB), and none is past the 33 MiB payload.
    assert_error_offset_within /tmp/i.err 16777216 34603008
    remove_scratch_device vmtest-eio
}

# The SOURCE is a block device with an `error` segment in the middle: a 24 MiB RAW image whose
# bytes 8..12 MiB fail with EIO (its start and end read fine, so the format probe succeeds and
# the copy is what meets the error).
check_teardown_source_error() {
    scratch_device vmtest-badsrc "0 16384 linear @DISK@ 131072
16384 8192 error
24576 24576 linear @DISK@ 155648"
    source=/dev/mapper/vmtest-badsrc
    out=/mnt/payload/s.luks
    daemon_start
    encrypt "$source" "$out" /tmp/s
    status=$?
    # Checked while the daemon still runs: its shutdown must not be what cleans up.
    expect_failure "$status" /tmp/s "$out"
    assert_job_devices_gone "$DAEMON_LOG"
    proc_alive "$DAEMON_PID" || fail "imgcryptd died after the read error"
    daemon_stop
    grep -q '"error":"io.imgcrypt.IoError"' /tmp/s.json || fail "the job did not fail with IoError"
    grep -qi 'input/output error' /tmp/s.err || fail "the error does not say it is an I/O error"
    grep -qi 'read' /tmp/s.err || fail "the error does not say reading the source failed"
    # Only bytes 8..12 MiB of the source fail: the message must say where.
    assert_error_offset_within /tmp/s.err 8388608 12582912
    remove_scratch_device vmtest-badsrc
}

# assert_error_offset_within ERR_FILE LOW HIGH: the error message names "at offset N" with
# LOW <= N < HIGH.
assert_error_offset_within() {
    offset=$(sed -n 's/.* at offset \([0-9]*\).*/\1/p' "$1" | head -n 1)
    [ -n "$offset" ] || fail "the error names no offset: $(cat "$1")"
    if [ "$offset" -lt "$2" ] || [ "$offset" -ge "$3" ]; then
        fail "the error names offset $offset, outside the failing range $2..$3"
    fi
}

# The client that asked, as the daemon saw it (SO_PEERCRED): "encrypt requested ... user_pid=Some(P)".
job_client_pid() {
    sed -n 's/.*encrypt requested .*user_pid=Some(\([0-9]*\)).*/\1/p' "$DAEMON_LOG" | tail -n 1
}

job_ended_without_client() {
    grep -q 'job ended after its client left' "$DAEMON_LOG"
}

# SIGKILL to imgctl mid-copy: the daemon sees the hang-up, cancels, tears down, and serves the
# next job.
check_teardown_cancel() {
    out=/mnt/payload/k.luks
    start_slow_encrypt "$out" /tmp/k
    imgctl_pid=$(job_client_pid)
    [ -n "$imgctl_pid" ] || fail "the daemon's log names no client pid"
    echo "mid-copy: $(imgcrypt_mappers | head -n 1); kill -9 imgctl ($imgctl_pid)"
    kill -9 "$imgctl_pid" || fail "cannot kill imgctl $imgctl_pid"
    wait_until 30 proc_gone "$client" || fail "imgctl survived kill -9"
    wait "$client" && fail "imgctl succeeded although it was killed"
    if ! wait_until 60 job_ended_without_client; then
        show_daemon_log
        fail "the daemon did not end the job within 60 s of its client's death"
    fi
    ended=$(grep 'job ended after its client left' "$DAEMON_LOG")
    echo "daemon: $ended"
    case $ended in
    *"left: cancelled"* | *"left: the encryption stopped"*"checkpointed"*) ;;
    *"left: finished"*) fail "precondition: the copy finished before the daemon cancelled it" ;;
    *) fail "the job ended otherwise than by cancellation: $ended" ;;
    esac
    # Checked while the daemon still runs: its shutdown must not be what cleans up.
    proc_alive "$DAEMON_PID" || fail "imgcryptd died when its client was killed"
    assert_job_devices_gone "$DAEMON_LOG"
    assert_no_leftovers "$out"
    [ ! -e "$out" ] || fail "$out exists after the cancelled job"
    # Only imgctl removes its partial file, and it was killed; the daemon holds no path to it.
    rm -f "$out.partial"

    # Still serving: a small job on the same daemon succeeds and decrypts to its source.
    next=/mnt/payload/k2.luks
    if ! encrypt "$SOURCE_D" "$next" /tmp/k2; then
        show_result /tmp/k2
        show_daemon_log
        fail "the daemon's next job failed: $(tail -n 1 /tmp/k2.err)"
    fi
    grep '"event":"summary"' /tmp/k2.json | grep -q '"engine":"kernel"' ||
        fail "the next job's summary does not name engine kernel"
    assert_no_leftovers "$next"
    daemon_stop
    verify_luks "$next" vmcheck-k2 "$D_VSIZE" "$D_SHA256"
}

# --- dispatch -----------------------------------------------------------------------------------

run_check() {
    case $1 in
    b-luks2-512 | b-luks2-4096 | b-luks1) check_userspace_output "${1#b-}" ;;
    a-kernel-encrypt) check_kernel_encrypt ;;
    e-kernel-ratio) check_kernel_ratio ;;
    c-kill9-restart) check_kill9_restart ;;
    d-unprivileged) check_unprivileged ;;
    teardown-enospc) check_teardown_enospc ;;
    teardown-enospc-write) check_teardown_enospc_write ;;
    teardown-sigterm) check_teardown_sigterm ;;
    teardown-eio) check_teardown_eio ;;
    teardown-source-error) check_teardown_source_error ;;
    teardown-cancel) check_teardown_cancel ;;
    *) fail "no such check: $1" ;;
    esac
}

# Between checks: nothing a failed check started may disturb the next one.
cleanup_after_check() {
    if [ -f "$PIDS" ]; then
        while read -r pid; do
            kill -9 "$pid" 2>/dev/null
        done <"$PIDS"
        rm -f "$PIDS"
    fi
    for name in $(dmsetup ls 2>/dev/null | awk '$1 ~ /^vmcheck-/ { print $1 }'); do
        cryptsetup close "$name" 2>/dev/null
    done
    for dir in /mnt/small /mnt/ext2; do
        is_mounted "$dir" && umount -l "$dir"
    done
    for name in vmtest-eio vmtest-badsrc; do
        dmsetup info "$name" >/dev/null 2>&1 && dmsetup remove "$name"
    done
    return 0
}
