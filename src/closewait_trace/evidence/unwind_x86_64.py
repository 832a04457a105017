"""Walking an x86-64 user stack from the two registers a blocked thread
shows us (PC and SP, from /proc/TID/syscall).

Frames are unwound with the binaries' .eh_frame call frame information while
the rules need only those two registers; when a rule needs one we cannot know
(the frame pointer of a function built with frame pointers), the rest of the
stack is found by scanning it for words that point just after a call
instruction, and those frames say so (method "scan").

`session` is the symbolizer's per-stack object: .image (procimage.ProcessImage),
.index_for(mapping) (an elfindex.ModuleIndex or None) and .frame(pc, method).
"""

from __future__ import annotations

from typing import Optional

RSP, RIP_RA = 7, 16           # x86_64 DWARF register numbers: rsp, return address
MAX_SCAN_BYTES = 16 * 1024


def _read_word(image, addr: int) -> Optional[int]:
    data = image.read(addr, 8)
    return int.from_bytes(data, "little") if len(data) == 8 else None


def cfi_step(session, pc: int, sp: int, is_first: bool):
    """(return address, caller's sp) from the CFI rules at pc, or None
    when the rules need a register we do not have."""
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
    if cfa_rule.expr is not None or cfa_rule.reg != RSP:
        return None
    cfa = sp + cfa_rule.offset
    ra_rule = row.get(RIP_RA)
    if ra_rule is None or ra_rule.type != "OFFSET":
        return None
    ra = _read_word(session.image, cfa + ra_rule.arg)
    if ra is None:
        return None
    return ra, cfa


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


def unwind(session, pc: int, sp: int, max_frames: int = 16) -> list:
    frames = [session.frame(pc, "pc")]
    is_first = True
    while len(frames) < max_frames:
        step = cfi_step(session, pc, sp, is_first)
        if step is None:
            break
        ra, cfa = step
        if ra == 0 or session.image.mapping(ra) is None:
            return frames
        frames.append(session.frame(ra, "cfi"))
        pc, sp, is_first = ra, cfa, False
    # Scan the rest of the stack for return addresses.
    stack = session.image.read(sp, MAX_SCAN_BYTES)
    for i in range(0, len(stack) - 7, 8):
        if len(frames) >= max_frames:
            break
        word = int.from_bytes(stack[i:i + 8], "little")
        if word and follows_call(session.image, word):
            frames.append(session.frame(word, "scan"))
    return frames
