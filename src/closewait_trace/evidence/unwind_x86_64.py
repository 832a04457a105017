"""Walking an x86-64 user stack from the two registers a blocked thread
shows us (PC and SP, from /proc/TID/syscall), or from the three the kernel
program copies with the top of the stack at an EOF read (PC, SP and the
frame pointer register, RBP).

Frames are unwound with the binaries' .eh_frame call frame information while
the rules need only the registers we have; RBP, when known, is followed
through the rules that save it, and where no rule covers a PC (Go binaries
have no .eh_frame; Go keeps frame pointers) the frame pointer chain is walked
(method "fp"), each return address checked to follow a call. Whatever is
left is found by scanning the stack for words that point just after a call
instruction, and those frames say so (method "scan").

`session` is the symbolizer's per-stack object: .image (procimage.ProcessImage),
.index_for(mapping) (an elfindex.ModuleIndex or None) and .frame(pc, method).
"""

from __future__ import annotations

from typing import Optional

RBP, RSP, RIP_RA = 6, 7, 16   # x86_64 DWARF register numbers: rbp, rsp, return address
MAX_SCAN_BYTES = 16 * 1024
# A frame pointer chain link longer than this is not one (Go's largest
# frames are far smaller; a C frame with a large array is unwound by CFI).
MAX_FP_FRAME = 1 << 20


def _read_word(image, addr: int) -> Optional[int]:
    data = image.read(addr, 8)
    return int.from_bytes(data, "little") if len(data) == 8 else None


def cfi_step(session, pc: int, sp: int, is_first: bool, bp: Optional[int] = None):
    """(return address, caller's sp, caller's rbp or None) from the CFI
    rules at pc, or None when the rules need a register we do not have."""
    m = session.image.mapping(pc)
    index = session.index_for(m) if m else None
    if index is None:
        return None
    # A return address points after the call; look up the call itself.
    lookup = pc if is_first else pc - 1
    vaddr = index.vaddr_of_offset(lookup - m.start + m.offset)
    fde = index.fde_for(vaddr) if vaddr is not None else None
    if fde is None:
        return None
    try:
        table = fde.get_decoded().table
    except Exception:       # pyelftools raises assorted errors on odd CFI
        return None
    row = None
    for candidate in table:
        if candidate["pc"] <= vaddr:
            row = candidate
        else:
            break
    if row is None or "cfa" not in row:
        return None
    cfa_rule = row["cfa"]
    if cfa_rule.expr is not None:
        return None
    if cfa_rule.reg == RSP:
        cfa = sp + cfa_rule.offset
    elif cfa_rule.reg == RBP and bp is not None:
        cfa = bp + cfa_rule.offset
    else:
        return None
    ra_rule = row.get(RIP_RA)
    if ra_rule is None or ra_rule.type != "OFFSET":
        return None
    ra = _read_word(session.image, cfa + ra_rule.arg)
    if ra is None:
        return None
    bp_rule = row.get(RBP)
    if bp is not None and bp_rule is not None:
        # Saved by this function: the caller's value is on the stack. Any
        # other rule than a saved slot: unknown from here on.
        bp = _read_word(session.image, cfa + bp_rule.arg) if bp_rule.type == "OFFSET" else None
    return ra, cfa, bp


def follows_call(image, addr: int) -> bool:
    """Does addr, in an executable file mapping, follow a call instruction?"""
    m = image.mapping(addr)
    if m is None or "x" not in m.perms or not m.path.startswith("/"):
        return False
    unread = image.unreadable_reason(m)
    if unread:                  # a FUSE or network file: never read, said so
        from closewait_trace.evidence import elfindex
        elfindex.note_problem(unread, m.path)
        return False
    before = image.read(addr - 7, 7)
    if len(before) != 7:
        return False
    if before[2] == 0xE8:                       # call rel32
        return True
    for length in (2, 3, 6, 7):                 # call *reg / *mem (ff /2)
        if before[7 - length] == 0xFF and (before[8 - length] >> 3) & 7 == 2:
            return True
    if before[1] == 0x41 and before[2] == 0xFF:  # REX.B call *%r8-15 variants
        return True
    return False


def fp_chain(session, bp: int, sp: int, room: int) -> list:
    """Return addresses along the frame pointer chain from bp: each link
    [bp] -> caller's bp, [bp + 8] -> return address. Distrusted: a link must
    lie above the stack pointer and above the previous link, within
    MAX_FP_FRAME of it (so the walk ends, whatever the stack holds), and
    each return address must follow a call instruction."""
    out = []
    low = sp
    while len(out) < room and low <= bp < low + MAX_FP_FRAME and bp % 8 == 0:
        caller_bp = _read_word(session.image, bp)
        ra = _read_word(session.image, bp + 8)
        if caller_bp is None or ra is None or not ra or not follows_call(session.image, ra):
            break
        out.append(ra)
        low, bp = bp + 16, caller_bp
    return out


def unwind(session, pc: int, sp: int, max_frames: int = 16,
           bp: Optional[int] = None) -> list:
    frames = [session.frame(pc, "pc")]
    is_first = True
    while len(frames) < max_frames:
        step = cfi_step(session, pc, sp, is_first, bp)
        if step is None:
            break
        ra, cfa, bp = step
        m = session.image.mapping(ra) if ra else None
        if m is None or "x" not in m.perms:
            # A return address points into code; anything else is a stack
            # we cannot follow (or one crafted to mislead): stop here.
            return frames
        frames.append(session.frame(ra, "cfi"))
        pc, sp, is_first = ra, cfa, False
    if bp is not None and len(frames) < max_frames:
        chain = fp_chain(session, bp, sp, max_frames - len(frames))
        frames.extend(session.frame(ra, "fp") for ra in chain)
        if chain:
            return frames
    # Scan the rest of the stack for return addresses.
    stack = session.image.read(sp, MAX_SCAN_BYTES)
    for i in range(0, len(stack) - 7, 8):
        if len(frames) >= max_frames:
            break
        word = int.from_bytes(stack[i:i + 8], "little")
        if word and follows_call(session.image, word):
            frames.append(session.frame(word, "scan"))
    return frames
