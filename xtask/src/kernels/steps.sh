# The steps of a kernel-matrix guest, run by its init inside the host's root (read-only;
# tmpfs on /tmp and /run). xtask/src/kernels appends the `step` lines. Each step's output
# goes to <name>.log in the run's share, its verdict to `results` and the console.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp CI=true RUST_BACKTRACE=1
# TCG runs the guest several times slower than the host: a test that waits for, or
# counts, something in wall-clock time scales its bounds by this (deadlines multiplied,
# rates divided).
export MESH_TEST_TIME_SCALE=5
OUT=/run/mesh-kernels
: >"$OUT/results"
step() {
	name=$1
	shift
	t0=$(cut -d' ' -f1 /proc/uptime)
	echo "mesh-kernels: $name: running"
	# A step that hangs must not take the ones after it down with it.
	{
		timeout -k 10 "$STEP_TIMEOUT" "$@"
		echo $? >"$OUT/$name.rc"
	} >"$OUT/$name.log" 2>&1 </dev/null
	rc=$(cat "$OUT/$name.rc")
	t1=$(cut -d' ' -f1 /proc/uptime)
	secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
	if [ "$rc" = 0 ]; then v=PASS; else v=FAIL; fi
	echo "step $name $v $secs $rc" >>"$OUT/results"
	echo "mesh-kernels: $name $v ($secs s)"
}
