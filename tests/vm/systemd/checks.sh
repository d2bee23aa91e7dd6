# The systemd guest's checks (tests/systemd_guest.rs). The host puts this file, the VM suite's
# checks.sh (sourced for its helpers: fail, wait_until, verify_luks, imgcrypt_mappers, ...), the
# package under test, a source image, a key and manifest.sh on the disk with serial `payload`;
# imgcrypt-guest-run (baked into the rootfs) mounts it at /mnt/payload and runs this file under
# systemd, as root, once the system is up.
#
# Prints, for the checks named on the kernel command line (imgcrypt_checks=a,b,...):
#   IMGCRYPT-START <check>, [<check>] <its output>, IMGCRYPT-RESULT <check> PASS|FAIL <s> <detail>
# and at the end IMGCRYPT-DONE <number of results>. The checks run in order and build on each
# other (the package is installed by the first); each runs in its own subshell.
#
# No sleeping as synchronisation: every wait polls a condition against a deadline.

P=/mnt/payload
. "$P/vm-checks.sh"
. "$P/manifest.sh"
# The VM suite's helpers name the initramfs's tools; here they are Debian's.
SETPRIV=/usr/bin/setpriv
LOSETUP=/usr/sbin/losetup
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

SOCKET=/run/imgcrypt/io.imgcrypt
# The MESSAGE_ID of the daemon's audit records (daemon/src/jobs/audit.rs).
AUDIT_MESSAGE_ID=35db536a90ca4c43b8300e87186d9a9a
MEMBER=alice
OUTSIDER=bob

# as USER COMMAND...: runs COMMAND as USER with the user's own groups (initgroups) and a clean
# environment, as a login would.
as() {
    user=$1
    shift
    "$SETPRIV" --reuid="$user" --regid="$user" --init-groups \
        env -i PATH=/usr/bin:/bin HOME="/home/$user" "$@"
}

# user_encrypt USER SOURCE OUTPUT RESULT_PREFIX [ARGS...]: imgctl as USER through the system
# socket (its default: no --socket), JSON lines to RESULT_PREFIX.json, stderr to .err.
user_encrypt() {
    user=$1 source=$2 output=$3 result=$4
    shift 4
    # shellcheck disable=SC2086 # CHEAP_PBKDF is several words
    timeout -s KILL "$JOB_TIMEOUT" "$SETPRIV" --reuid="$user" --regid="$user" --init-groups \
        env -i PATH=/usr/bin:/bin HOME="/home/$user" \
        imgctl encrypt "$source" -o "$output" --key-file "/home/$user/secret.dek" \
        $CHEAP_PBKDF --json "$@" >"$result.json" 2>"$result.err"
}

service_state() {
    systemctl show -P ActiveState imgcryptd.service
}

service_inactive() {
    [ "$(service_state)" = inactive ]
}

show_service() {
    systemctl status --no-pager imgcryptd.service imgcryptd.socket 2>&1 | sed 's/^/  /'
    echo "journal of imgcryptd.service:"
    journalctl --no-pager -u imgcryptd.service 2>&1 | tail -n 40 | sed 's/^/  /'
}

# --- the package -----------------------------------------------------------------------------

check_package_installs() {
    dpkg -i "$P/imgcrypt.deb" || fail "dpkg -i imgcrypt.deb failed"
    getent group imgcrypt >/dev/null || fail "the package created no group imgcrypt (sysusers.d)"
    [ "$(systemctl is-enabled imgcryptd.socket)" = enabled ] ||
        fail "imgcryptd.socket is not enabled: $(systemctl is-enabled imgcryptd.socket)"
    [ "$(systemctl is-active imgcryptd.socket)" = active ] ||
        fail "imgcryptd.socket is not active after install: $(systemctl is-active imgcryptd.socket)"
    service_inactive || fail "imgcryptd.service is $(service_state) before any client"
    [ -S "$SOCKET" ] || fail "no socket at $SOCKET"
    perms=$(stat -c '%A %U:%G' "$SOCKET")
    [ "$perms" = "srw-rw---- root:imgcrypt" ] || fail "$SOCKET is $perms, not srw-rw---- root:imgcrypt"
    exec_start=$(systemctl show -P ExecStart imgcryptd.service)
    echo "ExecStart: $exec_start"
    case $exec_start in
    *"path=/usr/sbin/imgcryptd "*) ;;
    *) fail "ExecStart is not the packaged /usr/sbin/imgcryptd: $exec_start" ;;
    esac
    [ -x /usr/sbin/imgcryptd ] && [ -x /usr/bin/imgctl ] || fail "binaries missing"
    for file in /usr/share/man/man1/imgctl.1.gz /usr/share/man/man1/imgctl-encrypt.1.gz \
        /usr/share/man/man8/imgcryptd.8.gz /usr/share/bash-completion/completions/imgctl \
        /usr/lib/tmpfiles.d/imgcryptd.conf; do
        [ -s "$file" ] || fail "the package did not install $file"
    done
    [ "$(stat -c '%a %U' /var/lib/imgcrypt)" = "700 root" ] ||
        fail "/var/lib/imgcrypt is $(stat -c '%a %U' /var/lib/imgcrypt 2>&1), not 700 root (tmpfiles.d)"
    # The users of the later checks: one in the group (as the operator guide says), one not.
    useradd -m -u 1000 "$MEMBER" && usermod -aG imgcrypt "$MEMBER" || fail "useradd $MEMBER"
    useradd -m -u 1001 "$OUTSIDER" || fail "useradd $OUTSIDER"
    for user in "$MEMBER" "$OUTSIDER"; do
        install -m 0400 -o "$user" -g "$user" "$KEY" "/home/$user/secret.dek"
    done
    echo "installed; socket $perms; service inactive"
}

# --- socket activation, and a member of imgcrypt encrypts -------------------------------------

check_socket_activation() {
    service_inactive || fail "imgcryptd.service is $(service_state) before the first imgctl call"
    out=/home/$MEMBER/activated.luks
    if ! user_encrypt "$MEMBER" "$SOURCE_A" "$out" /tmp/act --engine userspace; then
        show_result /tmp/act
        show_service
        fail "imgctl as $MEMBER failed: $(tail -n 1 /tmp/act.err)"
    fi
    state=$(service_state)
    [ "$state" = active ] || fail "imgcryptd.service is $state after the first call"
    systemctl show -P TriggeredBy imgcryptd.service | grep -q imgcryptd.socket ||
        fail "imgcryptd.service is not triggered by imgcryptd.socket"
    journalctl --no-pager -u imgcryptd.service | grep -q "using the socket passed by systemd" ||
        fail "the daemon did not log that it took systemd's socket"
    echo "inactive before, active after the first call"
}

check_member_encrypts() {
    out=/home/$MEMBER/activated.luks
    [ -f "$out" ] || fail "no $out from the socket-activation check"
    [ "$(stat -c %U "$out")" = "$MEMBER" ] || fail "$out belongs to $(stat -c %U "$out")"
    cryptsetup luksDump "$out" >/tmp/dump || fail "cryptsetup luksDump rejects $out"
    grep -q '^Version:[[:space:]]*2' /tmp/dump || fail "not LUKS2: $(head -n 3 /tmp/dump)"
    cryptsetup open --test-passphrase --key-file "$KEY" "$out" ||
        fail "cryptsetup open --test-passphrase rejects the key"
    verify_luks "$out" guest-member "$A_VSIZE" "$A_SHA256"
}

# --- the socket's permissions keep others out --------------------------------------------------

check_non_member_refused() {
    out=/home/$OUTSIDER/refused.luks
    # shellcheck disable=SC2086
    if timeout -s KILL "$JOB_TIMEOUT" "$SETPRIV" --reuid="$OUTSIDER" --regid="$OUTSIDER" \
        --init-groups env -i PATH=/usr/bin:/bin HOME="/home/$OUTSIDER" \
        imgctl --socket "$SOCKET" encrypt "$SOURCE_A" -o "$out" \
        --key-file "/home/$OUTSIDER/secret.dek" $CHEAP_PBKDF >/tmp/refused.out 2>/tmp/refused.err; then
        fail "imgctl as $OUTSIDER (not in imgcrypt) succeeded"
    fi
    cat /tmp/refused.err
    grep -q "Permission denied" /tmp/refused.err ||
        fail "refused, but not by the socket's permissions: $(tail -n 1 /tmp/refused.err)"
    [ ! -e "$out" ] || fail "$out exists"
}

# --- systemctl status shows the daemon's STATUS= text ------------------------------------------

status_idle() {
    systemctl status --no-pager imgcryptd.service | grep -q 'Status: "idle, 0 jobs running"'
}

check_status_text() {
    [ "$(service_state)" = active ] || fail "imgcryptd.service is $(service_state)"
    if ! wait_until 10 status_idle; then
        show_service
        fail "systemctl status shows no Status: \"idle, 0 jobs running\""
    fi
    systemctl status --no-pager imgcryptd.service | grep 'Status:'
}

# --- the kernel engine inside the sandbox --------------------------------------------------------

check_kernel_engine() {
    out=/home/$MEMBER/kernel.luks
    if ! user_encrypt "$MEMBER" "$SOURCE_A" "$out" /tmp/kernel --engine kernel; then
        show_result /tmp/kernel
        show_service
        fail "imgctl --engine kernel as $MEMBER failed: $(tail -n 1 /tmp/kernel.err)"
    fi
    grep '"event":"summary"' /tmp/kernel.json | grep -q '"engine":"kernel"' ||
        fail "the summary does not name engine kernel"
    assert_no_leftovers "$out"
    verify_luks "$out" guest-kernel "$A_VSIZE" "$A_SHA256"
}

# --- journald has the structured fields ---------------------------------------------------------

check_journal_fields() {
    journalctl --no-pager -u imgcryptd.service -o json >/tmp/journal.json ||
        fail "journalctl -o json failed"
    grep '"MESSAGE":"encrypted"' /tmp/journal.json >/tmp/encrypted.json ||
        fail "no 'encrypted' entry in the journal of imgcryptd.service"
    # Both jobs of the earlier checks.
    [ "$(wc -l </tmp/encrypted.json)" -ge 2 ] || fail "fewer than two 'encrypted' entries"
    line=$(head -n 1 /tmp/encrypted.json)
    # The event's own fields and the job span's (JOB_ID, USER_UID, ENGINE), with no prefix.
    for field in '"FORMAT":"luks"' '"FINGERPRINT":"' '"OUTPUT_SIZE":"' \
        '"JOB_ID":"' '"USER_UID":"' '"ENGINE":"' \
        '"_SYSTEMD_UNIT":"imgcryptd.service"' '"PRIORITY":"5"'; do
        case $line in
        *"$field"*) ;;
        *) fail "the journal entry lacks $field: $line" ;;
        esac
    done
    if grep -q '"F_' /tmp/journal.json; then
        fail "a field still has tracing-journald's F_ prefix: $(grep -o '"F_[A-Z_]*"' /tmp/journal.json | sort -u | tr '\n' ' ')"
    fi
    grep -q '"MESSAGE":"kernel engine (loop device + dm-crypt) available"' /tmp/journal.json ||
        fail "the daemon did not log the kernel engine as available"
    echo "$line" | tr ',' '\n' | grep -E '"(JOB|JOB_ID|USER_UID|ENGINE|FORMAT|FINGERPRINT|OUTPUT_SIZE)"'

    # The connection's and the registry's job lines name the job and the caller with the same
    # fields as the job's own records: JOB_ID and USER_UID, never JOB or UID.
    for message in 'encrypt requested' 'job started' 'job succeeded'; do
        line=$(grep "\"MESSAGE\":\"$message\"" /tmp/journal.json | head -n 1)
        [ -n "$line" ] || fail "no '$message' entry in the journal"
        for field in '"JOB_ID":"' '"USER_UID":"'; do
            case $line in
            *"$field"*) ;;
            *) fail "the '$message' entry lacks $field: $line" ;;
            esac
        done
        case $line in
        *'"JOB":"'* | *'"UID":"'* | *'"GID":"'* | *'"PID":"'*)
            fail "the '$message' entry still has JOB/UID/GID/PID: $line" ;;
        esac
    done

    # One audit record per job, found by its MESSAGE_ID (daemon/src/jobs/audit.rs).
    journalctl --no-pager -u imgcryptd.service -o json MESSAGE_ID="$AUDIT_MESSAGE_ID" \
        >/tmp/audit.json || fail "journalctl MESSAGE_ID=$AUDIT_MESSAGE_ID failed"
    grep '"METHOD":"encrypt"' /tmp/audit.json | grep '"RESULT":"succeeded"' >/tmp/audit-encrypt.json
    [ "$(wc -l </tmp/audit-encrypt.json)" -ge 2 ] ||
        fail "fewer than two succeeded encrypt audit records: $(cat /tmp/audit.json)"
    line=$(grep '"ENGINE":"kernel"' /tmp/audit-encrypt.json | head -n 1)
    [ -n "$line" ] || fail "no audit record of the kernel engine's job: $(cat /tmp/audit-encrypt.json)"
    for field in '"JOB_ID":"' '"USER_UID":"' '"USER_GID":"' '"USER_PID":"' '"BYTES":"' \
        '"SOURCE_DEV":"' '"SOURCE_INO":"' '"SOURCE_SIZE":"' '"SOURCE_MTIME":"' \
        '"OUTPUT_DEV":"' '"OUTPUT_INO":"' '"KEY_FINGERPRINT":"' '"DURATION_MS":"'; do
        case $line in
        *"$field"*) ;;
        *) fail "the audit record lacks $field: $line" ;;
        esac
    done
    echo "$line" | tr ',' '\n' | grep -E '"(MESSAGE|METHOD|RESULT|ENGINE|BYTES|USER_UID|KEY_FINGERPRINT)"'
}

# --- systemctl stop mid-job checkpoints and tears down; STATUS while it runs; a re-run resumes --

status_one_job() {
    systemctl status --no-pager imgcryptd.service | grep -q 'Status: "1 job running"'
}

# A resume checkpoint of the running job is in the service's StateDirectory.
checkpoint_saved() {
    ls /var/lib/imgcrypt/checkpoints/*/*.json >/dev/null 2>&1
}

check_stop_mid_job() {
    out=/home/$MEMBER/stopped.luks
    # The source behind dm-delay (vm-checks.sh), so the copy lasts seconds.
    mount_slow_source
    drop_caches
    user_encrypt "$MEMBER" "/mnt/slow/$SLOW_SOURCE" "$out" /tmp/stop --engine kernel &
    client=$!
    # The job holds its slot from the (slow) read of the source on: the status says so.
    if ! wait_until 60 status_one_job; then
        show_result /tmp/stop
        show_service
        fail "during the job, systemctl status does not show Status: \"1 job running\""
    fi
    systemctl status --no-pager imgcryptd.service | grep 'Status:'
    # Past a checkpoint and into the next range, so the re-run has something to resume.
    if ! wait_until 120 checkpoint_saved || ! wait_until 120 mid_copy; then
        show_result /tmp/stop
        show_service
        fail "never saw a checkpoint and the kernel engine's mapper mid-copy within 120 s"
    fi
    # At once: the copy itself is fast once the source is cached. That the job really was
    # stopped mid-way is proven below by imgctl failing.
    systemctl stop imgcryptd.service || fail "systemctl stop failed"
    echo "stopped mid-copy"
    service_inactive || fail "imgcryptd.service is $(service_state) after systemctl stop"
    wait_until 60 proc_gone "$client" || fail "imgctl did not exit within 60 s of the stop"
    if wait "$client"; then
        fail "imgctl succeeded although the service was stopped mid-copy"
    fi
    show_result /tmp/stop
    assert_no_leftovers "$out"
    [ ! -e "$out" ] || fail "$out exists after the stopped job"
    [ -e "$out.partial" ] || fail "imgctl did not keep $out.partial for the re-run"
    journalctl --no-pager -u imgcryptd.service | grep -q "SIGTERM received" ||
        fail "the daemon did not log SIGTERM"
    journalctl --no-pager -u imgcryptd.service | grep -q "progress checkpointed" ||
        fail "the daemon did not checkpoint the stopped job"
    grep -q "again to resume" /tmp/stop.err || fail "imgctl's error does not say how to resume"

    # After a start the same command resumes from the checkpoint.
    systemctl start imgcryptd.service || fail "systemctl start failed"
    if ! user_encrypt "$MEMBER" "/mnt/slow/$SLOW_SOURCE" "$out" /tmp/rerun --engine kernel; then
        show_result /tmp/rerun
        show_service
        fail "the re-run after systemctl start failed: $(tail -n 1 /tmp/rerun.err)"
    fi
    from=$(sed -n 's/.*"resumed_from":\([0-9]*\).*/\1/p' /tmp/rerun.json)
    [ -n "$from" ] && [ "$from" -gt 0 ] ||
        fail "the re-run did not resume past 0 (resumed_from '$from')"
    echo "the re-run resumed from payload byte $from"
    cryptsetup open --test-passphrase --key-file "$KEY" "$out" ||
        fail "cryptsetup rejects the re-run's output"
    [ ! -e "$out.partial" ] || fail "$out.partial remains after the re-run"
    assert_no_leftovers "$out"
}

# --- idle exit: socket-activated, the service stops when unused; the socket starts it again ----

check_idle_exit() {
    mkdir -p /run/systemd/system/imgcryptd.service.d
    printf '[Service]\nExecStart=\nExecStart=/usr/sbin/imgcryptd --idle-timeout 2\n' \
        >/run/systemd/system/imgcryptd.service.d/idle.conf
    systemctl daemon-reload
    systemctl stop imgcryptd.service
    # The service starts on this call and, with no client after it, exits 2 s later.
    as "$MEMBER" imgctl inspect "/home/$MEMBER/activated.luks" >/tmp/inspect.out 2>&1 ||
        fail "imgctl inspect failed: $(tail -n 1 /tmp/inspect.out)"
    if ! wait_until 60 service_inactive; then
        show_service
        fail "imgcryptd.service is still $(service_state) 60 s after its last client"
    fi
    journalctl --no-pager -u imgcryptd.service | grep -q "no client for" ||
        fail "the service stopped, but not by its idle timeout"
    [ "$(systemctl is-active imgcryptd.socket)" = active ] || fail "the socket did not stay active"
    as "$MEMBER" imgctl inspect "/home/$MEMBER/activated.luks" >/tmp/inspect.out 2>&1 ||
        fail "imgctl inspect after the idle exit failed: $(tail -n 1 /tmp/inspect.out)"
    rm -rf /run/systemd/system/imgcryptd.service.d
    systemctl daemon-reload
    echo "exited when idle; started again by the next call"
}

# --- the loop ----------------------------------------------------------------------------------

run_guest_check() {
    case $1 in
    package-installs) check_package_installs ;;
    socket-activation) check_socket_activation ;;
    member-encrypts) check_member_encrypts ;;
    non-member-refused) check_non_member_refused ;;
    status-text) check_status_text ;;
    kernel-engine) check_kernel_engine ;;
    journal-fields) check_journal_fields ;;
    stop-mid-job) check_stop_mid_job ;;
    idle-exit) check_idle_exit ;;
    *) fail "unknown check $1" ;;
    esac
}

checks=$(sed -n 's/.*imgcrypt_checks=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
count=0
for check in $checks; do
    echo "IMGCRYPT-START $check"
    start=$(uptime_centis)
    (run_guest_check "$check") >/tmp/check.log 2>&1
    status=$?
    elapsed=$(centis_to_seconds $(($(uptime_centis) - start)))
    sed "s/^/[$check] /" /tmp/check.log
    detail=$(sed -n 's/^FAIL-REASON: //p' /tmp/check.log | tail -n 1)
    if [ "$status" -eq 0 ]; then
        echo "IMGCRYPT-RESULT $check PASS $elapsed ok"
    else
        [ -n "$detail" ] || detail="exit status $status: $(tail -n 1 /tmp/check.log)"
        echo "IMGCRYPT-RESULT $check FAIL $elapsed $detail"
    fi
    count=$((count + 1))
done
echo "IMGCRYPT-DONE $count"
